"""Container healthcheck: exit 0 when URL answers 2xx. Sends PREFECT_SERVER_API_AUTH_STRING or
PREFECT_API_AUTH_STRING as basic auth when set (the Prefect API requires it), never printing it."""

import base64
import os
import sys
import urllib.request

request = urllib.request.Request(sys.argv[1])
auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or os.environ.get("PREFECT_API_AUTH_STRING")
if auth:
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=8) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {type(exc).__name__}", file=sys.stderr)
    sys.exit(1)
