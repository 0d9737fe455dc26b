-- tensorgate, Envoy listener filter (envoy.filters.http.lua, before the router).
--
-- Stock Open Inference Protocol clients send the model only in the protobuf body
-- (ModelInferRequest.model_name = field 1, model_version = field 2). This reads both from the
-- first gRPC message, in whatever order the fields arrive (the last occurrence wins, as in
-- protobuf), sets x-tensorgate-model / x-tensorgate-version and re-selects the route, so the
-- route table can match on headers.
--
-- Callers that send x-tensorgate-model themselves are not buffered at all. Otherwise the body is
-- buffered up to the listener's per_connection_buffer_limit_bytes (envoy.max_body_bytes); only
-- the field keys and the two strings are copied out (length-delimited fields such as
-- raw_input_contents are skipped by their length). A body that cannot be read (compressed,
-- malformed, several messages, a name that is not a route name) is left unlabelled: it matches
-- no model route and goes to the Python gateway, which answers it as it would directly.
--
-- Nothing runs on the way back: the variant's trailers come from the header_mutation filter's
-- per-route config (gateway/envoy/compile.py, _identity_trailers), with no body buffering.

local INFER = "/inference.GRPCInferenceService/ModelInfer"
local MAX_NAME = 128

-- The body is read through a window: one getBytes of up to WINDOW bytes serves every key and
-- length inside it (a call into Envoy per field would cost more than the parse); a key beyond
-- it (after a large raw_input_contents) moves the window there.
local WINDOW = 1024
local Reader = {}
Reader.__index = Reader

local function reader(buf)
  return setmetatable({buf = buf, size = buf:length(), base = 0, s = ""}, Reader)
end

function Reader:byte(pos)
  local i = pos - self.base + 1
  if i < 1 or i > #self.s then
    local n = self.size - pos
    if n > WINDOW then n = WINDOW end
    if n <= 0 then return nil end
    self.base, self.s = pos, self.buf:getBytes(pos, n)
    i = 1
  end
  return self.s:byte(i)
end

function Reader:bytes(pos, len)
  local i = pos - self.base + 1
  if i >= 1 and i + len - 1 <= #self.s then return self.s:sub(i, i + len - 1) end
  return self.buf:getBytes(pos, len)
end

local function varint(r, pos, stop)
  local value, scale = 0, 1
  for i = pos, math.min(stop, pos + 10) - 1 do
    local c = r:byte(i)
    if c == nil then return nil end
    if c < 128 then return value + c * scale, i + 1 end
    value = value + (c - 128) * scale
    scale = scale * 128
  end
  return nil
end

-- Calls `visit(field, wire, value_start, value_stop)` for each field of the message in
-- buf[start, stop); false when it does not parse or `visit` returns false.
local function each_field(buf, start, stop, visit)
  local pos = start
  while pos < stop do
    local key, after = varint(buf, pos, stop)
    if key == nil then return false end
    local field, wire = math.floor(key / 8), key % 8
    local value = after
    if wire == 0 then
      local _, a = varint(buf, after, stop)
      if a == nil then return false end
      pos = a
    elseif wire == 1 then
      pos = after + 8
    elseif wire == 5 then
      pos = after + 4
    elseif wire == 2 then
      local len, a = varint(buf, after, stop)
      if len == nil or a + len > stop then return false end
      value, pos = a, a + len
    else
      return false
    end
    if pos > stop or visit(field, wire, value, pos) == false then return false end
  end
  return pos == stop
end

-- Parameters (request, input or output) decide what a backend may be asked (the gateway's
-- allowlist: adapters/parameters.py; shared-memory parameters are never forwarded). A request
-- carrying any goes to the gateway, which applies that allowlist; Envoy forwards only requests
-- without them.
local function no_parameters(buf, start, stop, number)
  return each_field(buf, start, stop, function(field) return field ~= number end)
end

-- Fields 1 and 2 of the message in buf[start, stop); nil when it does not parse, or when the
-- request carries parameters anywhere.
local function name_and_version(buf, start, stop)
  local name, version = nil, ""
  local ok = each_field(buf, start, stop, function(field, wire, a, b)
    if field == 4 then return false end -- request parameters
    if wire ~= 2 then return true end
    if (field == 1 or field == 2) and b - a > MAX_NAME then return false end
    if field == 1 then
      name = buf:bytes(a, b - a)
    elseif field == 2 then
      version = buf:bytes(a, b - a)
    elseif field == 5 then
      return no_parameters(buf, a, b, 4) -- InferInputTensor.parameters
    elseif field == 6 then
      return no_parameters(buf, a, b, 2) -- InferRequestedOutputTensor.parameters
    end
    return true
  end)
  if not ok then return nil end
  return name, version
end

local function routable(s)
  return s ~= nil and s ~= "" and s:find("^[%w_.%-]+$") ~= nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get("x-tensorgate-model") ~= nil then return end
  if headers:get(":path") ~= INFER then return end
  headers:remove("x-tensorgate-version")
  local body = handle:body()
  if body == nil then return end
  local size = body:length()
  if size < 5 then return end
  local prefix = body:getBytes(0, 5)
  if prefix:byte(1) ~= 0 then return end
  local len = ((prefix:byte(2) * 256 + prefix:byte(3)) * 256 + prefix:byte(4)) * 256
    + prefix:byte(5)
  if 5 + len ~= size then return end
  local name, version = name_and_version(reader(body), 5, 5 + len)
  if not routable(name) then return end
  if version ~= "" and not routable(version) then return end
  -- The headers object from before body() is out of scope once the body arrived.
  headers = handle:headers()
  headers:replace("x-tensorgate-model", name)
  if version ~= "" then headers:replace("x-tensorgate-version", version) end
  handle:clearRouteCache()
end
