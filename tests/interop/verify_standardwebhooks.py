#!/usr/bin/env python3
"""Checks usage-agent's signatures against the reference Standard Webhooks library.

Usage:
  verify_standardwebhooks.py verify SECRET MSG_ID TIMESTAMP SIGNATURE_HEADER < body
      exit 0 if the library accepts the message, 1 if it rejects it
  verify_standardwebhooks.py sign SECRET MSG_ID TIMESTAMP < body
      print the library's signature header for the message, exit 0

Exit code 2 means the check could not run (bad usage, or the `standardwebhooks` package
is missing: install it with `python3 -m pip install standardwebhooks`), so a caller can
tell "rejected" from "not checked".
"""

import sys
from datetime import datetime, timezone

try:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
except ImportError as error:  # pragma: no cover - depends on the environment
    print(f"cannot import standardwebhooks ({error}); "
          "install it with: python3 -m pip install standardwebhooks", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) == 6 and argv[1] == "verify":
        _, _, secret, msg_id, timestamp, signature = argv
        body = sys.stdin.buffer.read()
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
        }
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
        except WebhookVerificationError as error:
            print(f"rejected: {error}")
            return 1
        print("verified")
        return 0
    if len(argv) == 5 and argv[1] == "sign":
        _, _, secret, msg_id, timestamp = argv
        body = sys.stdin.buffer.read().decode()
        at = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
        print(Webhook(secret).sign(msg_id, at, body))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
