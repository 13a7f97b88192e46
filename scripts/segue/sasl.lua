-- SASL client mechanisms for backends: PLAIN (RFC 4616) and SCRAM-SHA-1 /
-- SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding. The
-- primitives are segue.crypto's (OpenSSL, libsodium); this file only puts
-- the messages together and checks the server's proof. Usernames are
-- escaped as RFC 5802 says (= and ,); passwords are used as given (no
-- SASLprep: an ASCII password is the same either way).
local crypto = require "segue.crypto"

local M = {}

-- Mechanism name -> digest name, best first.
M.SCRAM = { { "SCRAM-SHA-256", "sha256" }, { "SCRAM-SHA-1", "sha1" } }

--- plain(user, password [, authzid]) -> the PLAIN message (not base64).
function M.plain(user, password, authzid)
  return (authzid or "") .. "\0" .. user .. "\0" .. password
end

local function attributes(msg)
  local a = {}
  for k, v in (msg .. ","):gmatch("(%a)=(.-),") do
    if a[k] == nil then a[k] = v end
  end
  return a
end

-- The SCRAM iteration count a server may ask for: enough for every real
-- server, low enough that a hostile one cannot stall the loop for minutes.
M.MAX_ITERATIONS = 1000000

--- scram(alg, user, password [, nonce]) -> a client session:
---   s:first()              -> client-first-message
---   s:final(server_first)  -> client-final-message | nil, err
---   s:verify(server_final) -> true | nil, err (the server proved it knows the password)
function M.scram(alg, user, password, nonce)
  assert(alg == "sha1" or alg == "sha256", "scram: alg is sha1 or sha256")
  local H = alg == "sha256" and crypto.sha256 or crypto.sha1
  local function hmac(k, d) return crypto.hmac(alg, k, d) end
  nonce = nonce or crypto.base64_encode(crypto.random(18))
  local name = user:gsub("=", "=3D"):gsub(",", "=2C")
  local bare = "n=" .. name .. ",r=" .. nonce
  local s, expected = {}, nil

  function s.first() return "n,," .. bare end

  function s.final(_, server_first)
    local a = attributes(server_first)
    if a.m then return nil, "the server requires a SCRAM extension we do not know" end
    if not a.r or not a.s or not a.i then return nil, "malformed server-first-message" end
    if a.r:sub(1, #nonce) ~= nonce or #a.r <= #nonce then return nil, "the server's nonce does not extend ours" end
    local iterations = math.tointeger(tonumber(a.i))
    if not iterations or iterations < 1 or iterations > M.MAX_ITERATIONS then
      return nil, "unacceptable iteration count " .. tostring(a.i)
    end
    local salt, err = crypto.base64_decode(a.s)
    if not salt then return nil, "bad salt: " .. err end
    local salted = crypto.pbkdf2(alg, password, salt, iterations)
    local client_key = hmac(salted, "Client Key")
    local without_proof = "c=biws,r=" .. a.r
    local auth = bare .. "," .. server_first .. "," .. without_proof
    local proof = crypto.xor(client_key, hmac(H(client_key), auth))
    expected = hmac(hmac(salted, "Server Key"), auth)
    return without_proof .. ",p=" .. crypto.base64_encode(proof)
  end

  function s.verify(_, server_final)
    local a = attributes(server_final or "")
    if a.e then return nil, "the server refused: " .. a.e end
    local v = a.v and crypto.base64_decode(a.v)
    if not expected or not v or not crypto.equal(v, expected) then
      return nil, "the server's signature is wrong: it does not know the password (or a man in the middle)"
    end
    return true
  end

  return s
end

return M
