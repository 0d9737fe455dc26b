"""Envoy mode: the route table compiled into Envoy resources and served to Envoys over xDS.

- compile.py: GatewayConfig -> listeners, routes, clusters, endpoints (pure; which route takes
  which path, and why).
- ads.py: the Aggregated Discovery Service Envoys connect to (versioned, ordered pushes).
- bootstrap.py: the Envoy bootstrap that points an Envoy at the control plane.
- rest.py: the KServe v2 REST listener (envoy.rest_listen): exact-path routes to the backends'
  REST ports, everything else to the gateway's REST listener.
- lua/: the filters Envoy runs (model from the request body; per-variant rename and trailers;
  the REST body check and path rewrite).
"""
