// A real OpenID Connect provider for DO-LAB's login tests: the npm package oidc-provider (certified), on loopback.
//
// Started by tests/e2e/auth/conftest.py:
//   node tests/oidc/server.mjs   with   DOLAB_OIDC_MODULES=<dir holding node_modules/oidc-provider>
//                                      DOLAB_OIDC_PORT=<port>  DOLAB_OIDC_USERS=<JSON>  [DOLAB_OIDC_ACCESS_TOKEN_TTL=<s>]
//
// DOLAB_OIDC_USERS: {"ana": {"password": "...", "groups": ["researchers"], "name": "Ana", "admin": false}, ...}
// Clients register themselves through the standard registration endpoint (RFC 7591, POST /reg), so each test hub
// gets its own client with its own redirect URI.
//
// Besides the provider, two test-only endpoints (this process only ever listens on 127.0.0.1):
//   POST /__control/mode  {"mode": "ok" | "down" | "garbage"}: what the back-channel endpoints the hub calls
//        (discovery, token, userinfo, jwks) do: answer, drop the connection, or answer an HTML page with status 200.
//        The pages a browser sees (authorize, login) keep working, so a login can reach the callback.
//   GET  /__control/stats  {"grants": {"authorization_code": n, "refresh_token": n}}
//   POST /__control/users  {"<login>": {"password": "...", "groups": [...], "hd": "..."}, ...}: add accounts or replace
//        what the provider knows of them (a stranger's account; a member removed from a group at the provider).
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const modules = process.env.DOLAB_OIDC_MODULES;
const port = Number(process.env.DOLAB_OIDC_PORT);
const users = JSON.parse(process.env.DOLAB_OIDC_USERS || '{}');
const accessTokenTtl = Number(process.env.DOLAB_OIDC_ACCESS_TOKEN_TTL || 3600);
if (!modules || !port) {
  console.error('DOLAB_OIDC_MODULES and DOLAB_OIDC_PORT are required');
  process.exit(2);
}
const { default: Provider } = await import(
  pathToFileURL(path.join(modules, 'node_modules', 'oidc-provider', 'lib', 'index.js')).href
);

const issuer = `http://127.0.0.1:${port}`;
const BACKCHANNEL = ['/token', '/me', '/.well-known/openid-configuration', '/jwks'];
let mode = 'ok';
const grants = { authorization_code: 0, refresh_token: 0 };

function claimsOf(login) {
  const user = users[login];
  return {
    sub: login,
    preferred_username: login,
    name: user.name || login,
    email: user.email || `${login}@example.org`,
    email_verified: true,
    verified_email: true, // Google's userinfo spells it so
    ...(user.hd ? { hd: user.hd } : {}), // Google Workspace: the user's domain
    groups: user.groups || [],
    dolab_admin: Boolean(user.admin),
  };
}

const provider = new Provider(issuer, {
  findAccount: async (ctx, id) =>
    users[id] ? { accountId: id, claims: async () => claimsOf(id) } : undefined,
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name', 'dolab_admin'],
    email: ['email', 'email_verified', 'verified_email', 'hd'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  features: {
    devInteractions: { enabled: false },
    registration: { enabled: true },
    revocation: { enabled: true },
  },
  // Like Keycloak: a client allowed the refresh_token grant gets a refresh token without prompt=consent.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    AccessToken: accessTokenTtl,
    AuthorizationCode: 120,
    IdToken: 3600,
    Grant: 86400,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 86400,
  },
  cookies: { keys: ['dolab-test-oidc-cookie-key'] },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});
provider.on('grant.success', (ctx) => {
  const type = ctx.oidc.params.grant_type;
  grants[type] = (grants[type] || 0) + 1;
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const escape = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

function loginPage(uid, error) {
  return `<!doctype html><html><head><title>Test identity provider</title></head><body>
<h1>Sign in to the test identity provider</h1>
${error ? `<p class="error">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
  <label>User <input name="login" autofocus></label>
  <label>Password <input name="password" type="password"></label>
  <button type="submit" id="signin">Sign in</button>
</form></body></html>`;
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

function send(res, status, type, body) {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(body);
}

// The login and consent steps (oidc-provider leaves these pages to the application).
async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    if (action !== 'login' || req.method !== 'POST') {
      return send(res, 200, 'text/html; charset=utf-8', loginPage(uid));
    }
    const form = await readForm(req);
    const login = form.get('login') || '';
    const user = users[login];
    if (!user || user.password !== form.get('password')) {
      return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, 'Wrong user name or password.'));
    }
    return provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
  }
  if (prompt.name === 'consent') {
    // First-party client: consent is implied, as in a company identity provider.
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  return send(res, 400, 'text/plain', `unknown prompt ${prompt.name}`);
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname === '/__control/mode' && req.method === 'POST') {
      mode = (await readJson(req)).mode;
      return send(res, 200, 'application/json', JSON.stringify({ mode }));
    }
    if (url.pathname === '/__control/users' && req.method === 'POST') {
      Object.assign(users, await readJson(req));
      return send(res, 200, 'application/json', JSON.stringify({ users: Object.keys(users) }));
    }
    if (url.pathname === '/__control/stats') {
      return send(res, 200, 'application/json', JSON.stringify({ grants, mode }));
    }
    if (BACKCHANNEL.includes(url.pathname) && mode !== 'ok') {
      if (mode === 'down') return req.socket.destroy();
      return send(res, 200, 'text/html', '<html><body><h1>502 Bad Gateway</h1>nginx</body></html>');
    }
    const match = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login))?$/);
    if (match) return await interaction(req, res, match[1], match[2]);
    return callback(req, res);
  } catch (err) {
    console.error(err);
    if (!res.headersSent) send(res, 500, 'text/plain', String(err));
  }
});
server.listen(port, '127.0.0.1', () => console.log(`oidc-provider listening on ${issuer}`));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
