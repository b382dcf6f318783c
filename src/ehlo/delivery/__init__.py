"""Outbound delivery: routing at RCPT, the scheduler that empties the queue, notices.

``routes`` decides at RCPT where each recipient goes (kept in the store,
handed to an LMTP server, relayed, or refused); the store queues what is
handed on in the message's own commit (``ehlo.storage.queue``); the
scheduler takes due entries, delivers them over SMTP or LMTP with the
client, records each attempt, retries and sends notices.
"""
