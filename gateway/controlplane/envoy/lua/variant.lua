-- tensorgate, upstream filter of a renamed variant's cluster (compile.py prepends
-- `local V = {...}`: the public model and version, the backend's model and version, and
-- `pinned_key` where those names are the same).
--
-- Every try, retry and mirrored copy to this cluster passes here: the request's model_name /
-- model_version become the backend's, the answer's become the public ones. Done by appending
-- fields 1 and 2 to the message (protobuf takes the last occurrence of a field) and rewriting
-- the 5-byte gRPC length prefix: the tensors are copied once, never parsed. Both bodies are
-- buffered whole (bounded by the cluster's per_connection_buffer_limit_bytes).

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

local TO_BACKEND = string_field(1, V.backend_model) .. string_field(2, V.backend_version)
local TO_PUBLIC = string_field(1, V.model) .. string_field(2, V.version)

-- A variant whose public names are the backend's (V.pinned_key set) is rewritten only for the
-- route's unpinned calls, which carry no version; a call the listener keyed `model@version`
-- (x-tensorgate-route is the listener's own, never a caller's) already names it, and passes
-- without buffering. Its answers already carry the public names.
function envoy_on_request(handle)
  if V.pinned_key ~= nil and handle:headers():get("x-tensorgate-route") == V.pinned_key then
    return
  end
  local body = handle:body()
  if body ~= nil then append(body, TO_BACKEND) end
end

function envoy_on_response(handle)
  if V.pinned_key ~= nil then return end
  if handle:headers():get("grpc-status") ~= nil then return end -- an error: no message
  local body = handle:body()
  if body ~= nil then append(body, TO_PUBLIC) end
end
