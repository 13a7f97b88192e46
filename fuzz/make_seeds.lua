-- Writes the seed corpora of the fuzz targets into DIR/<target>/ (the
-- committed ones are in fuzz/corpus/): segue exec fuzz/make_seeds.lua fuzz/corpus
-- Seeds are few and small on purpose: libFuzzer mutates from them, and each
-- one shows a target a different valid shape of its input.
local h = require "segue.harmony_core"
local dir = assert(arg[1], "usage: segue exec fuzz/make_seeds.lua DIR")

local function put(target, name, bytes)
  os.execute(("mkdir -p %q"):format(dir .. "/" .. target))
  local f = assert(io.open(("%s/%s/%s"):format(dir, target, name), "wb"))
  f:write(bytes)
  f:close()
end

-- flubber: byte 0 picks the split pattern (bits 0-6) and small limits (bit 7).
local init = '{"backend_name": "Example", "backend_version": [0, 0, 1], "protocol_version": [0, 1, 0]}'
put("flubber", "session-backend", "\0" .. table.concat({
  init,
  '{"sequence_number": 0, "body": {"type": "RoomID", "value": "#general"}}',
  '{"sequence_number": 1, "body": {"type": "Success", "value": null}}',
  '{"sequence_number": 2, "body": {"type": "MessageID", "value": "test"}}',
}, "\n") .. "\n")
-- The seed's session as the server sends it, with its invalid MessageSend.
put("flubber", "session-server", "\5" .. table.concat({
  '{"sequence_number": 0, "body": {"type": "RoomLookup", "value": "#general"}}',
  '{"sequence_number": 1, "body": {"type": "RoomJoin", "value": "#general"}}',
  '{"sequence_number": 2, "body": {"type": "MessageSend", "value": {"recipient": "#general", "attachments": [], "content": {"type": "Text", "value: "Hello, world!"}, "extra": null}}}',
}, "\n") .. "\n")
put("flubber", "message-upsert-pretty", "\17" .. [[
{
  "type": "MessageUpsert",
  "value": {
    "id": "m1", "sender": "@a", "recipient": "#r",
    "attachments": [{"mime": "image/png; charset=binary", "data": "aGVsbG8="}],
    "content": {"type": "Concat", "value": [
      {"type": "Bold", "value": {"type": "Italic", "value": {"type": "Text", "value": "h\u00e9\ud83d\ude00"}}},
      {"type": "UrlLink", "value": "https://example.org/"},
      {"type": "Emote", "value": ":)"}, {"type": "UserLink", "value": "@b"}
    ]},
    "create_time": 9007199254740992, "edit_time": -0, "extra": {"k": [1.5, 1e300, true, null]}
  }
}
]])
put("flubber", "updates-back-to-back", "\63" ..
  '{"type":"RoomUpsert","value":{"id":"#r","parent":null,"name":"r","sendable":true}}' ..
  '{"type":"RoomDelete","value":"#r"}{"type":"MessageDelete","value":"m1"}' ..
  '{"sequence_number":4294967295,"body":{"type":"Room","value":{"id":"#r","parent":"#p","name":"r","sendable":false,"unknown":1}}}')
put("flubber", "errors-small-limits", "\129" ..
  '{"sequence_number": 7, "body": {"type": "Error", "value": {"message": "busy", "debug_info": {"a": [[[[[[[[1]]]]]]]]}, "retry": true}}}\n' ..
  '{"sequence_number": 8, "body": {"type": "Message", "value": {"id": "m", "sender": "s", "recipient": "r", "attachments": [{"mime": "text/plain", "data": "' ..
  string.rep("QUJD", 30) .. '"}], "content": {"type": "Text", "value": "x"}, "create_time": 1, "edit_time": 2}}}\n' ..
  'true 12 -3.5e2 "bare" null\n')

-- harmony: one message of every kind, and tokens signed with the fuzz key
-- (seed bytes 1..32, fuzz_key_seed in fuzz/fuzz_common.h) in each accepted
-- encoding.
local messages = {
  { "protocol.sync.v1.PushRequest", { event = { user_added_to_guild = { user_id = 77, guild_id = 88 } } } },
  { "protocol.sync.v1.PushRequest", { event = { user_invited = { user_id = -1, inviter_id = 2, invite_id = "inv-\u{e9}" } } } },
  { "protocol.sync.v1.PullResponse", { event_queue = {
    { user_removed_from_guild = { user_id = 1, guild_id = 2 } },
    { user_rejected_invite = { guild_id = 3, user_id = 4, invite_id = "x" } } } } },
  { "protocol.sync.v1.AuthData", { server_id = "chat.example.org:2289", time = 1700000000 } },
  { "protocol.sync.v1.NotifyNewIdRequest", { new_server_id = "new.example.org:2289" } },
  { "protocol.auth.v1.KeyResponse", { key = string.rep("\7", 32) } },
  { "hrpc.v1.Error", { identifier = "h.bad-token", human_message = "no", details = "\8\30" } },
  { "hrpc.v1.RetryInfo", { retry_after = 30 } },
}
for i, m in ipairs(messages) do
  put("harmony", ("message-%d-%s"):format(i, m[1]:match("[^.]+$")), assert(h.encode(m[1], m[2])))
end
local seed = {}
for i = 1, 32 do seed[i] = string.char(i) end
seed = table.concat(seed)
local token = assert(h.token_create(seed, "chat.example.org:2289", 1700000000))
put("harmony", "token-base64", token)
put("harmony", "token-urlsafe", (token:gsub("+", "-"):gsub("/", "_"):gsub("=", "")))
put("harmony", "token-stale", assert(h.token_create(seed, "old.example.org:1", 5)))

-- http: byte 0 is the mode (bit 0: two halves, bit 1: half-close at once).
local function post(path, body, extra)
  return ("POST %s HTTP/1.1\r\nHost: segue\r\nContent-Type: application/hrpc\r\n%sContent-Length: %d\r\n\r\n%s")
    :format(path, extra or "", #body, body)
end
local push = assert(h.encode("protocol.sync.v1.PushRequest", messages[1][2]))
put("http", "push", "\0" .. post("/protocol.sync.v1.PostboxService/Push", push,
  "Authorization: " .. token .. "\r\n"))
put("http", "pull-chunked-pipelined", "\1" ..
  "POST /protocol.sync.v1.PostboxService/Pull HTTP/1.1\r\nContent-Type: application/hrpc; charset=binary\r\n" ..
  "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" ..
  post("/protocol.auth.v1.AuthService/Key", "") .. "GET /healthz?x=1 HTTP/1.1\r\n\r\n")
put("http", "expect-continue", "\0" .. post("/protocol.sync.v1.PostboxService/Push", push,
  "Expect: 100-continue\r\nAuthorization: " .. token:gsub("=", "") .. "\r\n"))
put("http", "refusals", "\2" ..
  "GET /protocol.sync.v1.PostboxService/Push HTTP/1.1\r\n\r\n" ..
  "POST /nowhere HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/hrpc\r\nContent-Length: 0\r\n\r\n" ..
  "POST /protocol.sync.v1.PostboxService/Push HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi")
put("http", "too-large", "\0" .. post("/protocol.sync.v1.PostboxService/Push", "", "Content-Length: 99999999\r\n"))
-- Mode bit 2: the federation's server, which admits FUZZ_PEER only.
local auth = "Authorization: " .. token .. "\r\n"
put("http", "federation-push-pull", "\4" ..
  post("/protocol.sync.v1.PostboxService/Push", push, auth) ..
  post("/protocol.sync.v1.PostboxService/Pull", "", auth) ..
  post("/protocol.sync.v1.PostboxService/NotifyNewId",
    assert(h.encode("protocol.sync.v1.NotifyNewIdRequest", { new_server_id = "new.example.org:1" })), auth) ..
  post("/protocol.auth.v1.AuthService/Key", ""))
local forged = assert(h.token_create(string.rep("\9", 32), "chat.example.org:2289", 1700000000))
put("http", "federation-refusals", "\6" ..
  post("/protocol.sync.v1.PostboxService/Push", push, "Authorization: " .. forged .. "\r\n") ..
  post("/protocol.sync.v1.PostboxService/Push", push, "Authorization: " ..
    assert(h.token_create(seed, "old.example.org:1", 5)) .. "\r\n") ..
  post("/protocol.sync.v1.PostboxService/Push", "\255\255", auth) ..
  post("/protocol.sync.v1.PostboxService/Push", push))

-- config: the shapes a config takes.
put("config", "default", require("segue.boot").default_config_text())
put("config", "full", [[
data_dir = "./data"
log_level = "debug"
limits = { request_timeout_ms = 5000, max_line_bytes = 1024 }
backends = {
  shell = { cmd = "sh", args = { "-c", "exit 0" }, env = { A = "1", B = 2, C = true }, cwd = "/",
            stop_grace_ms = 100, max_depth = 8 },
  mem = { script = "memory", options = { user = "segue", history = 10 } },
}
scripts = {}
]])
put("config", "returns-a-table", [[
return { backends = { m = { script = "memory" } }, limits = { init_timeout_ms = 1 } }
]])
put("config", "errors", [=[
-- every kind of mistake the checker names
log_level = "loud"
backends = { ["bad name"] = {}, x = { cmd = "/nonexistent", script = "memory" }, y = { cmd = 1 },
  z = { script = "nope", options = 3, env_file = "missing.env" } }
limits = { max_depth = -1, bogus = 1 }
scripts = { "missing.lua", 42 }
unknown = [[long string]]
]=])
