/**
 * DO-LAB's culler notice: the culler's warning about this server, as a JupyterLab notification.
 *
 * Users work in JupyterLab, not on the culler's page, so that is where a coming stop must show. Every poll
 * (the culler says how often, at most once a minute) this asks the culler's `api/warnings` for the current
 * user's warnings and shows the one about this server: why and when it stops, an "Extend" button for a stop
 * time (within the admin's limit; the culler's refusal is shown as it words it), "Keep it running" for an idle
 * warning, and a link to the culler's page.
 *
 * Authentication is the browser's hub login, the same as the culler's page: a hidden frame loads the culler's
 * `lab-session` page (a navigation, so the hub's OAuth redirects run and the service's cookies are set), which
 * hands over the XSRF value that cookie-authenticated API calls must send as `X-XSRFToken`. No token is kept.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';

import { IWarning, cullerBase, describe, extendLabel, when } from './text';

const DEFAULT_POLL_SECONDS = 60;
const SESSION_TIMEOUT_MS = 30_000;
/** After a failed login (no hub session, no access to the culler), the next try waits this long. */
const SESSION_RETRY_MS = 10 * 60_000;

/** What the culler's `lab-session` page hands over. */
interface ISession {
  user: string;
  xsrf: string;
  poll_seconds: number;
  page: string;
}

/** Loads the culler's `lab-session` page in a hidden frame; null when it does not end there (no hub login). */
function loadSession(base: string): Promise<ISession | null> {
  return new Promise(resolve => {
    const frame = document.createElement('iframe');
    frame.style.display = 'none';
    frame.setAttribute('aria-hidden', 'true');
    frame.title = 'DO-LAB culler session';
    let done = false;
    const finish = (session: ISession | null): void => {
      if (!done) {
        done = true;
        window.clearTimeout(timer);
        frame.remove();
        resolve(session);
      }
    };
    const timer = window.setTimeout(() => finish(null), SESSION_TIMEOUT_MS);
    frame.addEventListener('load', () => {
      try {
        const element = frame.contentDocument?.getElementById('dolab-culler-session');
        finish(element ? (JSON.parse(element.textContent ?? '') as ISession) : null);
      } catch {
        finish(null);
      }
    });
    frame.src = base + 'lab-session';
    document.body.appendChild(frame);
  });
}

/** Polls the culler and keeps one notification per warning about this server. */
class CullerNotice {
  private session: ISession | null = null;
  private sessionRetryAt = 0;
  /** Warning key (reason and stop time) -> notification id. */
  private shown = new Map<string, string>();
  private complained = false;

  constructor(
    private readonly base: string,
    private readonly user: string,
    private readonly server: string
  ) {}

  /** Poll now, then again every `poll_seconds`. */
  async run(): Promise<void> {
    let seconds = DEFAULT_POLL_SECONDS;
    try {
      await this.poll();
      seconds = this.session?.poll_seconds || DEFAULT_POLL_SECONDS;
    } catch (error) {
      if (!this.complained) {
        this.complained = true;
        console.warn('DO-LAB culler notice: cannot read the culler\'s warnings', error);
      }
    }
    window.setTimeout(() => void this.run(), Math.max(1, seconds) * 1000);
  }

  /** A call to the culler's API, with the session's XSRF value; logs in again once when refused. */
  private async call(path: string, init: RequestInit = {}): Promise<Response | null> {
    for (let attempt = 0; attempt < 2; attempt++) {
      if (this.session === null || attempt > 0) {
        if (Date.now() < this.sessionRetryAt) {
          return null;
        }
        this.session = await loadSession(this.base);
        if (this.session === null) {
          this.sessionRetryAt = Date.now() + SESSION_RETRY_MS;
          return null;
        }
      }
      const reply = await fetch(this.base + path, {
        ...init,
        credentials: 'same-origin',
        cache: 'no-store',
        headers: { Accept: 'application/json', 'Content-Type': 'application/json', 'X-XSRFToken': this.session.xsrf }
      });
      if (reply.status !== 403) {
        return reply;
      }
    }
    return null;
  }

  private async poll(): Promise<void> {
    const reply = await this.call('api/warnings');
    if (reply === null || !reply.ok || this.session?.user !== this.user) {
      return; // not logged in to the hub, or someone else's server (an admin's visit): nothing to show
    }
    const warnings = ((await reply.json()).warnings ?? []) as IWarning[];
    const current = new Set<string>();
    for (const warning of warnings.filter(w => w.server === this.server)) {
      const key = `${warning.reason}@${warning.stop_at}`;
      current.add(key);
      if (!this.shown.has(key)) {
        this.show(warning, key);
      }
    }
    for (const [key, id] of this.shown) {
      if (!current.has(key)) {
        Notification.dismiss(id); // extended, used again, or stopped: the warning is gone
        this.shown.delete(key);
      }
    }
  }

  private details(): Notification.IAction {
    return {
      label: 'Details',
      caption: "Your servers' stop times, on the culler's page",
      callback: () => window.open(this.session?.page ?? this.base, '_blank', 'noopener')
    };
  }

  private show(warning: IWarning, key: string): void {
    const actions: Notification.IAction[] = [];
    const hours = warning.extend_hours ?? 0;
    if (warning.reason === 'deadline' && hours > 0) {
      actions.push({
        label: extendLabel(hours),
        displayType: 'accent',
        callback: event => {
          event.preventDefault(); // keep the notification: it reports the outcome
          void this.act(key, 'api/extend', { server: warning.server, hours });
        }
      });
    }
    if (warning.reason === 'idle') {
      actions.push({
        label: 'Keep it running',
        displayType: 'accent',
        callback: event => {
          event.preventDefault();
          void this.act(key, 'api/keepalive', { server: warning.server });
        }
      });
    }
    actions.push(this.details());
    this.shown.set(key, Notification.warning(describe(warning, Date.now()), { autoClose: false, actions }));
  }

  /** An Extend or Keep-alive click: the outcome replaces the warning (the culler's sentence on a refusal). */
  private async act(key: string, path: string, body: Record<string, unknown>): Promise<void> {
    const id = this.shown.get(key);
    if (id === undefined) {
      return;
    }
    let message = 'The culler did not answer; try again in a minute.';
    let ok = false;
    try {
      const reply = await this.call(path, { method: 'POST', body: JSON.stringify(body) });
      const answer = reply === null ? {} : await reply.json().catch(() => ({}));
      ok = reply !== null && reply.ok;
      if (ok && answer.stop_at) {
        message = `Extended: this server now stops at ${when(answer.stop_at, Date.now())}.`;
      } else if (ok) {
        message = 'Noted: this server keeps running while you use it.';
      } else if (reply === null) {
        message = 'Log in to the hub again to change your stop time.';
      } else if (typeof answer.message === 'string' && answer.message) {
        message = answer.message;
      }
    } catch (error) {
      console.warn('DO-LAB culler notice: the culler did not answer', error);
    }
    if (ok) {
      this.shown.delete(key); // the warning is over; the success note closes by itself
      Notification.update({ id, message, type: 'success', autoClose: 10_000, actions: [] });
    } else {
      Notification.update({ id, message, type: 'error', autoClose: false, actions: [this.details()] });
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dolab-culler-notice:plugin',
  description: "Shows DO-LAB's culler warnings about this server, with a one-click Extend.",
  autoStart: true,
  activate: (app: JupyterFrontEnd): void => {
    const base = cullerBase(PageConfig.getOption('hubPrefix'), PageConfig.getOption('hubHost'), window.location.origin);
    const owner = PageConfig.getOption('hubServerUser');
    const user = PageConfig.getOption('hubUser');
    if (!base || !user || (owner && owner !== user)) {
      return; // not under JupyterHub, or someone else's server
    }
    const notice = new CullerNotice(base, user, PageConfig.getOption('hubServerName'));
    void app.restored.then(() => notice.run());
  }
};

export default plugin;
