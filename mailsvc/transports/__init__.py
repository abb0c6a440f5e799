"""Transports: SMTP, Mailgun and the dev maildir."""
