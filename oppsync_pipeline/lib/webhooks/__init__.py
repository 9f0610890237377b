"""Change notifications from the CRMs (seed 001's webhook-powered sync), turned into syncs within seconds.

  receiver.py   what a CRM's receiver provides: verify a request as that CRM signs it, read its notifications,
                answer it, register the subscription (one module per CRM with webhooks, all alike)
  inbox.py      verified notifications, deduplicated by the CRM's event id, waiting for the sensor
  app.py        the ASGI app `oppsync webhooks serve` runs (Starlette on uvicorn): one endpoint per connection,
                refusing before any work what is not signed, too big, malformed or too frequent
Autotask has no opportunity webhooks (`supportsWebhookCallouts` is false for Opportunities): it is polled only.
The hourly schedule and the nightly full sync stay the safety net for notifications that never arrive.
"""
