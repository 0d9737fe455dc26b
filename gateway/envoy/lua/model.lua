-- tensorgate, Envoy listener filter (envoy.filters.http.lua, before the router).
--
-- Stock Open Inference Protocol clients send the model only in the protobuf body
-- (ModelInferRequest.model_name = field 1, model_version = field 2). This reads both from the
-- first gRPC message, in whatever order the fields arrive (the last occurrence wins, as in
-- protobuf), sets x-tensorgate-route to `model@version` (or `model` without a version) and
-- re-selects the route: the route table is a match table keyed by that header
-- (gateway/envoy/compile.py), one lookup at any number of models.
--
-- Callers that send x-tensorgate-model (and x-tensorgate-version) themselves are not buffered
-- at all: the key comes from those headers. Otherwise the body is buffered up to the
-- listener's per_connection_buffer_limit_bytes (envoy.max_body_bytes); only the field keys and
-- the two strings are copied out (length-delimited fields such as raw_input_contents are
-- skipped by their length). A caller's own x-tensorgate-route is always dropped. A call that
-- cannot be keyed (another RPC, a compressed, malformed or multi-message body, a name that is
-- not a route name) matches no route and goes to the Python gateway, which answers it as it
-- would directly.
--
-- Nothing runs on the way back: the variant's trailers come from the header_mutation filter's
-- per-route config (gateway/envoy/compile.py, _identity_trailers), with no body buffering.

local INFER = "/inference.GRPCInferenceService/ModelInfer"
local MAX_NAME = 128

-- The body is read through a window: one getBytes of up to WINDOW bytes serves every key and
-- length inside it (a call into Envoy per field would cost more than the parse); a key beyond
-- it (after a large raw_input_contents) moves the window there. The parse is plain loops over
-- that string, no closures or method calls per field. Measured at 16 in flight, this whole
-- filter (buffering, parse, route re-selection) costs ~20-28 us of Envoy CPU per call, a sixth
-- of Envoy's cost; the parse itself is a small part of it.
local WINDOW = 4096
local KEY_AND_LENGTH = 20 -- two varints of at most 10 bytes each
local byte, sub, floor = string.byte, string.sub, math.floor

-- The window (s, covering buf[base, base + #s)) moved so that it holds buf[pos, pos + 20),
-- or everything from pos to the end.
local function window(buf, size, s, base, pos)
  local last = base + #s
  if pos >= base and (pos + KEY_AND_LENGTH <= last or last >= size) then return s, base end
  local n = size - pos
  if n > WINDOW then n = WINDOW end
  if n <= 0 then return "", pos end
  return buf:getBytes(pos, n), pos
end

-- The varint at s[i]; nil when it does not end within 10 bytes or the window.
local function varint(s, i)
  local value, scale = 0, 1
  for j = i, i + 9 do
    local c = byte(s, j)
    if c == nil then return nil end
    if c < 128 then return value + c * scale, j + 1 end
    value = value + (c - 128) * scale
    scale = scale * 128
  end
  return nil
end

-- Walks the fields of buf[pos, stop). `refused` is a field number whose presence fails the walk
-- (parameters). At the top level (ModelInferRequest) it also returns fields 1 and 2 (the last
-- occurrence wins, as in protobuf) and walks inputs (5) and outputs (6) for their parameters.
-- Returns ok, s, base, name, version.
local function walk(buf, size, s, base, pos, stop, refused, top)
  local name, version
  while pos < stop do
    s, base = window(buf, size, s, base, pos)
    local key, i = varint(s, pos - base + 1)
    if key == nil then return false end
    local field, wire = floor(key / 8), key % 8
    if field == refused then return false end
    if wire == 2 then
      local len
      len, i = varint(s, i)
      if len == nil then return false end
      local a = base + i - 1
      pos = a + len
      if pos > stop then return false end
      if top then
        if field == 1 or field == 2 then
          if len > MAX_NAME then return false end
          local value
          if i + len - 1 <= #s then
            value = sub(s, i, i + len - 1)
          else
            value = buf:getBytes(a, len)
          end
          if field == 1 then name = value else version = value end
        elseif field == 5 or field == 6 then
          -- InferInputTensor.parameters = 4, InferRequestedOutputTensor.parameters = 2
          local ok
          ok, s, base = walk(buf, size, s, base, a, pos, field == 5 and 4 or 2, false)
          if not ok then return false end
        end
      end
    elseif wire == 0 then
      local _
      _, i = varint(s, i)
      if i == nil then return false end
      pos = base + i - 1
    elseif wire == 1 then
      pos = base + i - 1 + 8
    elseif wire == 5 then
      pos = base + i - 1 + 4
    else
      return false
    end
  end
  if pos ~= stop then return false end
  return true, s, base, name, version
end

-- Parameters (request, input or output) decide what a backend may be asked (the gateway's
-- allowlist: adapters/parameters.py; shared-memory parameters are never forwarded). A request
-- carrying any goes to the gateway, which applies that allowlist; Envoy forwards only requests
-- without them. Returns the model name and version (nil when the body does not parse or carries
-- parameters anywhere).
local function name_and_version(buf, size, head, stop)
  local ok, _, _, name, version = walk(buf, size, head, 0, 5, stop, 4, true)
  if not ok then return nil end
  return name, version or ""
end

local function routable(s)
  return s ~= nil and s ~= "" and s:find("^[%w_.%-]+$") ~= nil
end

local ROUTE = "x-tensorgate-route"

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(ROUTE)
  if headers:get(":path") ~= INFER then return end
  local name, version = headers:get("x-tensorgate-model"), nil
  if name ~= nil then
    version = headers:get("x-tensorgate-version") or ""
  else
    local body = handle:body()
    if body == nil then return end
    local size = body:length()
    if size < 5 then return end
    -- The gRPC prefix and the first window in one call.
    local head = body:getBytes(0, size < 5 + WINDOW and size or 5 + WINDOW)
    local flag, b1, b2, b3, b4 = byte(head, 1, 5)
    if flag ~= 0 then return end
    if 5 + ((b1 * 256 + b2) * 256 + b3) * 256 + b4 ~= size then return end
    name, version = name_and_version(body, size, head, size)
    -- The headers object from before body() is out of scope once the body arrived.
    headers = handle:headers()
  end
  if not routable(name) then return end
  if version == "" then
    headers:replace(ROUTE, name)
  elseif routable(version) then
    headers:replace(ROUTE, name .. "@" .. version)
  else
    return
  end
  handle:clearRouteCache()
end
