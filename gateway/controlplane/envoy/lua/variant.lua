-- tensorgate, upstream filter of a backend cluster and of a shadow's cluster (clusters.py
-- prepends `local V = ...`).
--
-- A backend cluster is shared by every route on its backend (V = nil): what to write comes per
-- call in x-tensorgate-rename, set by the route for the variant the router picked
-- (clusters.rename_value): `backend_model,backend_version` rewrites the request, and
-- `,model,version` after it the answer too; names are %XX-escaped beyond [A-Za-z0-9_.-]. The
-- listener removes a caller's header before any filter runs (listener.early_mutations), so the
-- value is always the control plane's. No header: the call passes untouched, nothing buffered.
--
-- A shadow's cluster has its names as constants (V: the public model and version, the
-- backend's, and `pinned_key` where those are the same): a mirrored copy carries the primary's
-- headers, so the header is not read there.
--
-- Every try, retry and mirrored copy passes here: the request's model_name / model_version
-- become the backend's, the answer's become the public ones. Done by appending fields 1 and 2 to
-- the message (protobuf takes the last occurrence of a field) and rewriting the 5-byte gRPC
-- length prefix: the tensors are copied once, never parsed. Both bodies are buffered whole
-- (bounded by the cluster's per_connection_buffer_limit_bytes).

local function varint_bytes(n)
  local out = {}
  repeat
    local b = n % 128
    n = math.floor(n / 128)
    if n > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end

local function string_field(number, value)
  return string.char(number * 8 + 2) .. varint_bytes(#value) .. value
end

-- Appends `extra` to the single uncompressed gRPC message in `body`; false if it is not one.
local function append(body, extra)
  local size = body:length()
  if size < 5 then return false end
  local prefix = body:getBytes(0, 5)
  if prefix:byte(1) ~= 0 then return false end
  local len = ((prefix:byte(2) * 256 + prefix:byte(3)) * 256 + prefix:byte(4)) * 256
    + prefix:byte(5)
  if 5 + len ~= size then return false end
  local total = len + #extra
  local header = string.char(
    0,
    math.floor(total / 16777216) % 256,
    math.floor(total / 65536) % 256,
    math.floor(total / 256) % 256,
    total % 256
  )
  body:setBytes(header .. body:getBytes(5, len) .. extra)
  return true
end

local HEADER = "x-tensorgate-rename"
local NAMESPACE = "tensorgate.rename" -- dynamic metadata: the answer's rewrite, request to response

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Header value -> {request = bytes, answer = bytes or nil}; a worker's routes use a bounded set
-- of values, so each is parsed once per Lua state.
local parsed, count = {}, 0
local function rewrite_of(value)
  local hit = parsed[value]
  if hit ~= nil then return hit end
  local parts = {}
  for part in (value .. ","):gmatch("([^,]*),") do parts[#parts + 1] = unescape(part) end
  local out = {request = string_field(1, parts[1] or "") .. string_field(2, parts[2] or "")}
  if #parts >= 4 then out.answer = string_field(1, parts[3]) .. string_field(2, parts[4]) end
  if count >= 4096 then parsed, count = {}, 0 end
  parsed[value], count = out, count + 1
  return out
end

local CONSTANT = nil
if V ~= nil then
  CONSTANT = {request = string_field(1, V.backend_model) .. string_field(2, V.backend_version)}
  if V.pinned_key == nil then
    CONSTANT.answer = string_field(1, V.model) .. string_field(2, V.version)
  end
end

function envoy_on_request(handle)
  local rewrite
  if CONSTANT ~= nil then
    -- A shadow whose public names are the backend's: a call the listener keyed `model@version`
    -- (x-tensorgate-route is the listener's own, never a caller's) already names them.
    if V.pinned_key ~= nil and handle:headers():get("x-tensorgate-route") == V.pinned_key then
      return
    end
    rewrite = CONSTANT
  else
    local value = handle:headers():get(HEADER)
    if value == nil then return end
    rewrite = rewrite_of(value)
    if rewrite.answer ~= nil then
      handle:streamInfo():dynamicMetadata():set(NAMESPACE, "answer", value)
    end
  end
  local body = handle:body()
  if body ~= nil then append(body, rewrite.request) end
end

function envoy_on_response(handle)
  local answer
  if CONSTANT ~= nil then
    answer = CONSTANT.answer
  else
    local meta = handle:streamInfo():dynamicMetadata():get(NAMESPACE)
    if meta ~= nil and meta.answer ~= nil then answer = rewrite_of(meta.answer).answer end
  end
  if answer == nil then return end
  if handle:headers():get("grpc-status") ~= nil then return end -- an error: no message
  local body = handle:body()
  if body ~= nil then append(body, answer) end
end
