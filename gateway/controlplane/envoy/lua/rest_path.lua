-- tensorgate, upstream filter of a REST cluster that writes the path (rest.py prepends
-- `local PATH = ...`): the inference path at the backend, /v2/models/{model}/versions/{v}/infer.
--
-- Only where the route cannot rewrite the path itself: an unpinned route whose variants run
-- different versions (one weighted route, a path per entry), and a shadow's cluster (a mirrored
-- copy carries the primary's path). A backend cluster (PATH nil) writes the path the route's
-- entry named in x-tensorgate-rest-path (the REST listener removes a caller's on arrival); a
-- shadow's cluster writes its constant. Headers only: the body passes untouched.

local HEADER = "x-tensorgate-rest-path"

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = PATH
  if path == nil then path = headers:get(HEADER) end
  if path ~= nil then headers:replace(":path", path) end
end
