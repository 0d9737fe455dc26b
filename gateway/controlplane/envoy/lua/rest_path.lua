-- tensorgate, upstream filter of a REST variant cluster (rest.py prepends `local PATH = "..."`:
-- the variant's inference path at its backend, /v2/models/{model}/versions/{version}/infer).
--
-- Only where the route cannot rewrite the path itself: an unpinned route whose variants run
-- different versions (one weighted route, a path per cluster), and a shadow's cluster (a
-- mirrored copy carries the primary's path). Headers only: the body passes untouched.

function envoy_on_request(handle)
  handle:headers():replace(":path", PATH)
end
