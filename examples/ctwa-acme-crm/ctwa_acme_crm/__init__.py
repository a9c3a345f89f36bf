"""An integrator's plugins for ctwa-gateway, as a separate package found through entry points.

- :mod:`ctwa_acme_crm.crm_csv`, a resolver: a CRM's ``externalId`` -> the customer's phone,
  from a CSV export, then the conversation of that phone;
- :mod:`ctwa_acme_crm.http_sink`, an outbox sink: every event POSTed as JSON to the CRM's
  webhook, with the gateway's retries, replay, metrics and history.

Both import nothing but :mod:`gateway`'s public API.
"""
