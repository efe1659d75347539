"""Talk to `tidegate serve examples/serve.yaml` with the official openai client and plain HTTP.

    TIDEGATE_API_KEY=tg_... python examples/online_client.py [http://127.0.0.1:8000]
"""

from __future__ import annotations

import os
import sys
import uuid

import httpx
from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
key = os.environ["TIDEGATE_API_KEY"]

client = OpenAI(base_url=f"{base}/v1", api_key=key)
reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where is my parcel?"}])
print("chat:", reply.choices[0].message.content)
print("guards:", reply.tidegate["status"], [r["rule"] for r in reply.tidegate["rule_results"]])

for chunk in client.chat.completions.create(model="tiny", stream=True,
                                            messages=[{"role": "user", "content": "How do returns work?"}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True) if chunk.choices else None
print()

# The job's own route: an event, as the Kafka job would consume it. The Idempotency-Key makes a
# retry return the first answer (and store one row).
event = {"ticket_id": f"T-{uuid.uuid4().hex[:6]}", "question": "Can I change my delivery address?"}
r = httpx.post(f"{base}/v1/jobs/support-online/invoke", json=event,
               headers={"Authorization": f"Bearer {key}", "Idempotency-Key": event["ticket_id"]})
print("invoke:", r.status_code, r.json())
