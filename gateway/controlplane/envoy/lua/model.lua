-- tensorgate, Envoy listener filter (envoy.filters.http.lua, before the router; listener.py
-- prepends `local SHARDS = n`).
--
-- Stock Open Inference Protocol clients send the model only in the protobuf body
-- (ModelInferRequest.model_name = field 1, model_version = field 2). This reads both from the
-- first gRPC message, in whatever order the fields arrive (the last occurrence wins, as in
-- protobuf), sets x-tensorgate-route to `model@version` (or `model` without a version) and
-- re-selects the route: the route table is a match table keyed by that header
-- (gateway/controlplane/envoy/compile.py), one lookup at any number of models.
--
-- Envoy routes only what it has read exactly as the backend will (docs/envoy.md, "One body,
-- one reading"). Triton parses the body with C++ protobuf, which keeps the low 32 bits of an
-- over-long field key and reads a length as a 32-bit number: a reader that decodes wider
-- numbers sees another field (a key `8a 80 80 80 10` is field 1 for Triton and field 2^29+1 to
-- a 64-bit reader), and a caller could name one model to Envoy and another to Triton, or hide
-- a shared-memory parameter. So this filter accepts only what a protobuf writer produces from
-- the protocol's own fields: each key one byte (every field of the request and its tensors
-- has a key below 128), with its declared wire type, each length in at most 5 bytes without
-- padding; no unknown fields (the gateway refuses them too), no groups, no parameters.
-- Everything else is not routed here: it goes to the Python gateway, which answers it as it
-- would directly. Routing headers from callers (x-tensorgate-route, and the
-- x-tensorgate-model/-version that earlier versions honoured without reading the body) are
-- never trusted: the body alone names the model.
--
-- The body is buffered up to the listener's per_connection_buffer_limit_bytes
-- (envoy.max_body_bytes); only the field keys and the two strings are copied out
-- (length-delimited fields such as raw_input_contents are skipped by their length). A call that
-- cannot be keyed (another RPC, a compressed, malformed or multi-message body, a name that is
-- not a route name, parameters anywhere) matches no route and goes to the Python gateway, which
-- answers it as it would directly.
--
-- Nothing runs on the way back: the variant's trailers come from the header_mutation filter's
-- per-route config (gateway/controlplane/envoy/compile.py, _identity_trailers), with no body buffering.

local INFER = "/inference.GRPCInferenceService/ModelInfer"
local MAX_NAME = 128
local MAX_ID = 256 -- the gateway's bound on a request id (gateway/dataplane/layers/validation.py)

-- The body is read through a window: one getBytes of up to WINDOW bytes serves every key and
-- length inside it (a call into Envoy per field would cost more than the parse); a key beyond
-- it (after a large raw_input_contents) moves the window there. The parse is plain loops over
-- that string, no closures or method calls per field. Measured at 16 in flight, this whole
-- filter (buffering, parse, route re-selection) costs ~20-28 us of Envoy CPU per call, a sixth
-- of Envoy's cost; the parse itself is a small part of it.
local WINDOW = 4096
local KEY_AND_LENGTH = 20 -- a key (1 byte) and a varint (at most 10)
local byte, sub = string.byte, string.sub

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

-- A length at s[i] as a protobuf writer writes it: at most 5 bytes, the last one not a padding
-- 0, below 2^31 (C++'s largest). nil otherwise: C++ reads a longer varint as a 32-bit number.
local function length(s, i)
  local value, scale = 0, 1
  for j = i, i + 4 do
    local c = byte(s, j)
    if c == nil then return nil end
    if c < 128 then
      if c == 0 and j > i then return nil end
      value = value + c * scale
      if value >= 2147483648 then return nil end
      return value, j + 1
    end
    value = value + (c - 128) * scale
    scale = scale * 128
  end
  return nil
end

-- The fields each message may hold, by key (field number * 8 + wire type), as the Open
-- Inference Protocol defines them: every key below 128, so a protobuf writer writes each as
-- one byte, and a key written otherwise (padded, over-long, another field or wire type, a
-- group) fails the walk. Parameters (request 4, input 4, output 2) are absent: they decide what
-- a backend may be asked (shared memory above all), so a request carrying any goes to the
-- gateway, which applies its allowlist (adapters/parameters.py). The values: true = skipped,
-- a table = the nested message's fields, "name"/"version" = read, "id" = bounded as the
-- gateway bounds it.
local CONTENTS = {} -- InferTensorContents: 1-5 varint (packed or not), 6 fixed32, 7 fixed64, 8
for field = 1, 5 do
  CONTENTS[field * 8] = true
  CONTENTS[field * 8 + 2] = true
end
CONTENTS[53], CONTENTS[50], CONTENTS[57], CONTENTS[58], CONTENTS[66] = true, true, true, true, true
-- InferInputTensor: name, datatype, shape (unpacked or packed), contents
local INPUT = { [10] = true, [18] = true, [24] = true, [26] = true, [42] = CONTENTS }
local OUTPUT = { [10] = true } -- InferRequestedOutputTensor: name
-- ModelInferRequest: model_name, model_version, id, inputs, outputs, raw_input_contents
local REQUEST = {
  [10] = "name", [18] = "version", [26] = "id", [42] = INPUT, [50] = OUTPUT, [58] = true,
}

-- Walks the fields of buf[pos, stop), a message whose fields are `fields`. Returns ok, s, base
-- and, for the request, model_name and model_version (the last occurrence wins, as in protobuf).
local function walk(buf, size, s, base, pos, stop, fields)
  local name, version
  while pos < stop do
    s, base = window(buf, size, s, base, pos)
    local i = pos - base + 1
    local key = byte(s, i)
    local kind = fields[key]
    if kind == nil then return false end
    i = i + 1
    local wire = key % 8
    if wire == 2 then
      local len
      len, i = length(s, i)
      if len == nil then return false end
      local a = base + i - 1
      pos = a + len
      if pos > stop then return false end
      if kind == "id" then
        if len > MAX_ID then return false end
      elseif kind == "name" or kind == "version" then
        if len > MAX_NAME then return false end
        local value
        if i + len - 1 <= #s then
          value = sub(s, i, i + len - 1)
        else
          value = buf:getBytes(a, len)
        end
        if kind == "name" then name = value else version = value end
      elseif kind ~= true then
        local ok
        ok, s, base = walk(buf, size, s, base, a, pos, kind)
        if not ok then return false end
      end
    elseif wire == 0 then
      local _
      _, i = varint(s, i)
      if i == nil then return false end
      pos = base + i - 1
    elseif wire == 1 then
      pos = base + i - 1 + 8
    else -- 5: the tables hold no other wire type
      pos = base + i - 1 + 4
    end
  end
  if pos ~= stop then return false end
  return true, s, base, name, version
end

-- The model name and version; nil when the body is not a request this filter may route (it
-- does not parse as above, or carries parameters anywhere).
local function name_and_version(buf, size, head, stop)
  local ok, _, _, name, version = walk(buf, size, head, 0, 5, stop, REQUEST)
  if not ok then return nil end
  return name, version or ""
end

local function routable(s)
  return s ~= nil and s ~= "" and s:find("^[%w_.%-]+$") ~= nil
end

local ROUTE = "x-tensorgate-route"

-- The scope key (resources.shard_of, the same arithmetic): which of the SHARDS route
-- configurations (scoped routes) holds this model's routes. The listener sets shard 0 on every
-- request as it arrives (a caller's replaced), so a call this filter does not key still finds a
-- table, whose no-match action is the gateway.
local SHARD = "x-tensorgate-shard"
local function shard_of(name)
  local h = 0
  for i = 1, #name do h = (h * 31 + byte(name, i)) % 2147483647 end
  return h % SHARDS
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(ROUTE)
  if headers:get(":path") ~= INFER then return end
  local body = handle:body()
  if body == nil then return end
  local size = body:length()
  if size < 5 then return end
  -- The gRPC prefix and the first window in one call.
  local head = body:getBytes(0, size < 5 + WINDOW and size or 5 + WINDOW)
  local flag, b1, b2, b3, b4 = byte(head, 1, 5)
  if flag ~= 0 then return end
  if 5 + ((b1 * 256 + b2) * 256 + b3) * 256 + b4 ~= size then return end
  local name, version = name_and_version(body, size, head, size)
  if not routable(name) then return end
  -- The headers object from before body() is out of scope once the body arrived.
  headers = handle:headers()
  if version == "" then
    headers:replace(ROUTE, name)
  elseif routable(version) then
    headers:replace(ROUTE, name .. "@" .. version)
  else
    return
  end
  headers:replace(SHARD, tostring(shard_of(name)))
  handle:clearRouteCache()
end
