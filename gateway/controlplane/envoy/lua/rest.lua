-- tensorgate, Envoy REST listener filter (envoy.filters.http.lua, before the router).
-- gateway/controlplane/envoy/rest.py prepends `local C = {...}`: the hand-over header, the
-- request headers that hand a call over, and the gateway's bound on a request id.
--
-- The route table already matched the exact path of an inference call Envoy serves
-- (`/v2/models/{m}[/versions/{v}]/infer`: the model is in the URL, not in the body). This filter
-- runs on those routes only (the gateway route disables it) and decides whether Envoy may
-- forward the call to the backend as it is, or must hand it to the gateway's REST listener,
-- never refusing anything itself: the gateway answers what it is handed as it would directly.
--
-- Why: Triton's HTTP endpoint honours `parameters` that read and write shared-memory regions
-- other clients registered (`shared_memory_region`), and ignores keys it does not know; the
-- gateway applies its parameter allowlist (adapters/parameters.py) and refuses unknown keys
-- (gateway/dataplane/rest/codec.py). So Envoy forwards a body only when its JSON holds the keys
-- the gateway reads, each where the gateway reads it (request: id, parameters, inputs, outputs;
-- input: name, datatype, shape, data, parameters; output: name, parameters), and no parameter
-- but Triton's binary tensor flags, each where it belongs (request: binary_data_output; input:
-- binary_data_size; output: binary_data), which the gateway's REST listener honours as Triton
-- does.
--
-- One body, one reading (docs/envoy.md): the JSON is what Triton parses, the first
-- Inference-Header-Content-Length bytes when that header is sent, else the whole body. A reader
-- that skipped escapes could miss `"p\u0061rameters"`, which Triton's JSON parser reads as
-- `parameters`; so a JSON part holding any backslash is handed over. Without backslashes a key
-- is its literal bytes and a string cannot hold a quote, so the walk below needs no JSON parser:
-- it steps from one structural character to the next (strings skipped whole), keeping the place
-- of each open object or array. The caller's `id` is bounded as the gateway bounds it.
-- Compressed bodies (content-encoding; Triton would inflate them) and calls with the caller's
-- deadline header are handed over; so is any method but POST.
--
-- The body is buffered up to the listener's per_connection_buffer_limit_bytes
-- (envoy.max_body_bytes); only the JSON part is copied out, never the binary tensors after it.

-- Cost: this filter is most of what Envoy's REST listener adds to a bare Envoy hop (a Lua call
-- into Envoy, or a Lua pattern match, costs about a microsecond here), so the walk uses plain
-- finds and byte compares, one pattern find per structural character; measured at 16 in flight
-- (bench/envoy_rest.py): docs/envoy.md.

local byte, find, sub = string.byte, string.find, string.sub
local QUOTE, COMMA, COLON, LBRACKET, RBRACKET = 34, 44, 58, 91, 93
local LBRACE, RBRACE = 123, 125
local STRUCTURAL = '[{}%[%]"]'
local BOOL, UINT = 1, 2

-- Places: what an object there may hold (`keys`: key -> the place of its value), what an array
-- there holds (`element`), or which flags a parameters object there may hold (`flags`).
local SCALARS = {} -- strings, numbers, arrays of them: no object
SCALARS.element = SCALARS
local ID = { element = SCALARS }
local INPUT = {
  keys = {
    name = SCALARS, datatype = SCALARS, shape = SCALARS, data = SCALARS,
    parameters = { flags = { binary_data_size = UINT } },
  },
}
local OUTPUT = { keys = { name = SCALARS, parameters = { flags = { binary_data = BOOL } } } }
local REQUEST = {
  keys = {
    id = ID,
    parameters = { flags = { binary_data_output = BOOL } },
    inputs = { element = INPUT },
    outputs = { element = OUTPUT },
  },
}

-- The first position at or after i that is not JSON whitespace, and its byte.
local function skip(s, i)
  local c = byte(s, i)
  while c == 32 or c == 10 or c == 13 or c == 9 do
    i = i + 1
    c = byte(s, i)
  end
  return i, c
end

-- The end (just past `}`) of the flat object of `flags` at s[i]; nil when it is anything else.
local function flags_end(s, i, flags)
  if byte(s, i) ~= LBRACE then return nil end
  local pos, c = skip(s, i + 1)
  if c == RBRACE then return pos + 1 end
  local seen = {}
  while true do
    if c ~= QUOTE then return nil end
    local close = find(s, '"', pos + 1, true)
    if close == nil then return nil end
    local key = sub(s, pos + 1, close - 1)
    local kind = flags[key]
    if kind == nil or seen[key] then return nil end
    seen[key] = true
    pos, c = skip(s, close + 1)
    if c ~= COLON then return nil end
    local value = skip(s, pos + 1)
    local stop
    if kind == BOOL then
      if sub(s, value, value + 3) == "true" then
        stop = value + 4
      elseif sub(s, value, value + 4) == "false" then
        stop = value + 5
      else
        return nil
      end
    else
      stop = value
      local d = byte(s, stop)
      while d ~= nil and d >= 48 and d <= 57 do
        stop = stop + 1
        d = byte(s, stop)
      end
      if stop == value then return nil end
    end
    pos, c = skip(s, stop)
    if c == RBRACE then return pos + 1 end
    if c ~= COMMA then return nil end
    pos, c = skip(s, pos + 1)
  end
end

-- May Envoy forward this JSON part to the backend as it is? (Malformed JSON may pass: Triton
-- and the gateway both refuse it.) A key twice in one object is handed over: Triton's parser
-- takes the first, the gateway's the last.
local function forwardable(json)
  if find(json, "\\", 1, true) then return false end
  local open, seen, depth = {}, {}, 0 -- each open object's or array's place, an object's keys
  local pending = REQUEST -- the place of the next value opened
  local pos = 1
  while true do
    local at = find(json, STRUCTURAL, pos)
    if at == nil then return true end
    local c = byte(json, at)
    if c == QUOTE then
      local close = find(json, '"', at + 1, true)
      if close == nil then return true end
      local colon, follows = skip(json, close + 1)
      if follows ~= COLON then
        pos = close + 1 -- a string value
      else
        local key = sub(json, at + 1, close - 1)
        local keys = depth > 0 and open[depth].keys
        local place = keys and keys[key]
        if not place or seen[depth][key] then return false end
        seen[depth][key] = true
        pos = skip(json, colon + 1)
        if place.flags then
          pos = flags_end(json, pos, place.flags)
          if pos == nil then return false end
        elseif place == ID and byte(json, pos) == QUOTE then
          local stop = find(json, '"', pos + 1, true)
          if stop ~= nil and stop - pos - 1 > C.max_id then return false end
        end
        pending = place
      end
    elseif c == LBRACE or c == LBRACKET then
      if c == LBRACE and pending.keys == nil then return false end -- an object where none belongs
      if c == LBRACKET and pending.element == nil then return false end
      depth = depth + 1
      open[depth], seen[depth] = pending, {}
      pending = pending.element or SCALARS
      pos = at + 1
    else -- RBRACE, RBRACKET
      depth = depth - 1
      if depth < 0 then return true end
      pending = depth > 0 and (open[depth].element or SCALARS) or SCALARS
      pos = at + 1
    end
  end
end

local function hand_over(handle)
  handle:headers():replace(C.hand_over, "1")
  handle:clearRouteCache()
end

local LENGTH = "inference-header-content-length"

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" then return hand_over(handle) end
  for _, name in ipairs(C.hand_over_headers) do
    if headers:get(name) ~= nil then return hand_over(handle) end
  end
  local declared = headers:get(LENGTH)
  if declared ~= nil and (not find(declared, "^%d+$") or headers:getNumValues(LENGTH) > 1) then
    return hand_over(handle)
  end
  local body = handle:body()
  if body == nil then return hand_over(handle) end
  local size = body:length()
  local n = size
  if declared ~= nil then n = tonumber(declared) end
  if n == 0 or n > size then return hand_over(handle) end
  if not forwardable(body:getBytes(0, n)) then return hand_over(handle) end
end
