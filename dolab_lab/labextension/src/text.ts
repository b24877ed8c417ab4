/**
 * The notice's pure parts: where the culler is, and what the notification says. No JupyterLab imports, so
 * tests/lab/test_notice.py runs them in Node.
 */

/** The culler service's name in the hub. */
export const SERVICE = 'dolab-culler';

/** One warning of the culler's `api/warnings`. */
export interface IWarning {
  server: string;
  reason: string;
  stop_at: string;
  message: string;
  extend_hours?: number;
}

/**
 * The culler's address, beside the hub's (`<base>services/dolab-culler/`, from JupyterHub's `hubPrefix`, which
 * is `<base>hub/`), or null where there is no hub or the hub is on another origin (subdomain hosting: its
 * cookies and frames are out of reach).
 */
export function cullerBase(hubPrefix: string, hubHost: string, origin: string): string | null {
  if (!hubPrefix || !hubPrefix.startsWith('/') || (hubHost && hubHost !== origin)) {
    return null;
  }
  const base = hubPrefix.replace(/hub\/?$/, '').replace(/\/*$/, '/');
  return `${base}services/${SERVICE}/`;
}

/** A stop time as the user reads it: their clock, and how far from `now` (milliseconds since the epoch). */
export function when(stopAt: string, now: number): string {
  const date = new Date(stopAt);
  const minutes = Math.max(0, Math.round((date.getTime() - now) / 60_000));
  const clock =
    minutes > 12 * 60
      ? date.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' })
      : date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const away = minutes <= 1 ? 'in a minute' : minutes < 120 ? `in ${minutes} min` : `in ${Math.round(minutes / 60)} h`;
  return `${clock} (${away})`;
}

/** The notification's text: why and when (a toast shows at most 140 characters). */
export function describe(warning: IWarning, now: number): string {
  const stops = `This server stops at ${when(warning.stop_at, now)}`;
  switch (warning.reason) {
    case 'deadline':
      return `${stops}: the stop time you chose.`;
    case 'idle':
      return `${stops}: it has been idle.`;
    case 'max_age':
      return `${stops}: it has run as long as its profile allows. Save your work.`;
    default:
      return warning.message;
  }
}

/** The Extend button's label. */
export function extendLabel(hours: number): string {
  return `Extend by ${hours} hour${hours === 1 ? '' : 's'}`;
}
