"""Request-path layers. Each module holds one policy and declares, in its `LAYER`, everything the
gateway needs to know about it: its settings (read from the route's effective RoutePolicy), when
it is on for a route, its long-lived state (metrics, budgets, trackers; built once per runtime)
and how it is built for one route. The per-route part of the path is compiled from
`chain.route_layers()` when a route is first called: a layer that is off for a route is not in that
route's chain at all, so it costs nothing there.

Each layer also declares what the Envoy data plane does with it (`envoy`): either the Envoy
compiler translates it (no reasons), or the reasons a route using it must be answered by the
Python data plane; `gateway/controlplane/envoy/compile.py` decides each route from these
declarations alone.
And each names the config fields it owns (`fields`): tests/test_policy_coverage.py fails for a
field of Route, Variant, RoutePolicy or Backend that no layer or component owns, so a new field
cannot be silently ignored by a path.

Adding a layer touches three files: its module, the config proto (its policy message), and the
list in `chain.route_layers()`. See docs/architecture.md.
"""
