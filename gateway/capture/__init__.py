"""Webhook capture, pure: decode a signed notification part by part into what to store.

``inbox`` drives it (archive first, then capture); ``payload`` is Meta's shape, ``extract``
and ``values`` decode it, ``records`` is what comes out, ``identities`` merges people known by
phone and by business-scoped user id. The SQL lives in :mod:`gateway.store.capture`.
"""
