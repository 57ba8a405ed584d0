"""Say when a run ends: an e-mail (smtplib) and/or a webhook, from the main process.

The SMTP password comes only from the environment variable SMTP_PASSWORD: it is never part of
the config, so it is never written to config.yaml or the logs. A notification that cannot be
sent is logged as a warning; it never fails the run.
"""

import json
import os
import smtplib
import socket
import urllib.request
from email.message import EmailMessage

from toolkit.run.logs import log, result_line


def notify(cfg, summary):
    n = cfg.notify
    if not (n.email or n.webhook):
        return
    subject = f"[minloop] {summary.status}: {summary.run_dir}"
    body = message(summary)
    if n.email:
        try:
            send_email(n, subject, body)
            log.info(f"notified {n.email}")
        except (OSError, smtplib.SMTPException) as e:
            log.warning(f"could not e-mail {n.email} through {n.smtp_host}:{n.smtp_port}: {e}")
    if n.webhook:
        try:
            post = urllib.request.Request(n.webhook, data=json.dumps({"text": f"{subject}\n{body}"}).encode(),
                                          headers={"Content-Type": "application/json"})
            urllib.request.urlopen(post, timeout=30).close()
            log.info("notified the webhook")
        except OSError as e:
            log.warning(f"could not post to the webhook: {e}")


def message(summary):
    """The text of a notification, from the run's `Summary`."""
    lines = [result_line(summary)]  # the final metrics, or how the run ended and why
    lines.append(f"epochs {summary.epochs}, steps {summary.steps}, {summary.wall_time_s:.0f}s of training")
    if summary.best:
        lines.append(f"best {summary.best['monitor']}={summary.best['value']:.6g} ({summary.best['checkpoint']})")
    return "\n".join(lines) + "\n"


def send_email(n, subject, body):
    mail = EmailMessage()
    mail["Subject"] = subject
    mail["From"] = n.sender or f"minloop@{socket.gethostname()}"
    mail["To"] = n.email
    mail.set_content(body)
    with smtplib.SMTP(n.smtp_host, n.smtp_port, timeout=30) as smtp:
        if n.smtp_starttls:
            smtp.starttls()
        if n.smtp_user:
            smtp.login(n.smtp_user, os.environ.get("SMTP_PASSWORD", ""))
        smtp.send_message(mail)
