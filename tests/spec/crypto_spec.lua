-- segue.crypto against published test vectors: FIPS 180 (SHA), RFC 4231 and
-- RFC 2202 (HMAC), RFC 6070 (PBKDF2-HMAC-SHA1), RFC 7914 section 11
-- (PBKDF2-HMAC-SHA256), and the SCRAM-SHA-1 exchange of RFC 5802 section 5.
local crypto = require "segue.crypto"
local hex = crypto.hex

describe("segue.crypto", function()
  it("hashes with SHA-1 and SHA-256 as FIPS 180 says", function()
    assert.are.equal("a9993e364706816aba3e25717850c26c9cd0d89d", hex(crypto.sha1("abc")))
    assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
      hex(crypto.sha256("abc")))
    assert.are.equal("da39a3ee5e6b4b0d3255bfef95601890afd80709", hex(crypto.sha1("")))
  end)

  it("computes HMAC-SHA-256 (RFC 4231 case 2) and HMAC-SHA-1 (RFC 2202 case 2)", function()
    assert.are.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
      hex(crypto.hmac("sha256", "Jefe", "what do ya want for nothing?")))
    assert.are.equal("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79",
      hex(crypto.hmac("sha1", "Jefe", "what do ya want for nothing?")))
  end)

  it("derives keys with PBKDF2 (RFC 6070 and RFC 7914 vectors)", function()
    assert.are.equal("0c60c80f961f0e71f3a9b524af6012062fe037a6",
      hex(crypto.pbkdf2("sha1", "password", "salt", 1, 20)))
    assert.are.equal("4b007901b765489abead49d926f721d065a429c1",
      hex(crypto.pbkdf2("sha1", "password", "salt", 4096)))
    assert.are.equal("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
      .. "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
      hex(crypto.pbkdf2("sha256", "passwd", "salt", 1, 64)))
  end)

  it("reproduces the SCRAM-SHA-1 client proof of RFC 5802", function()
    local salt = assert(crypto.base64_decode("QSXCR+Q6sek8bf92"))
    local salted = crypto.pbkdf2("sha1", "pencil", salt, 4096)
    local client_key = crypto.hmac("sha1", salted, "Client Key")
    local auth = "n=user,r=fyko+d2lbbFgONRv9qkxdawL,"
      .. "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096,"
      .. "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    local proof = crypto.xor(client_key, crypto.hmac("sha1", crypto.sha1(client_key), auth))
    assert.are.equal("v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", crypto.base64_encode(proof))
    local server_sig = crypto.hmac("sha1", crypto.hmac("sha1", salted, "Server Key"), auth)
    assert.are.equal("rmF9pqV8S7suAoZWja4dJRkFsKQ=", crypto.base64_encode(server_sig))
  end)

  it("gives random bytes of the asked length that differ between calls", function()
    local a, b = crypto.random(24), crypto.random(24)
    assert.are.equal(24, #a)
    assert.are_not.equal(a, b)
    assert.has_error(function() crypto.random(0) end)
  end)

  it("round-trips base64 and refuses text that is not base64", function()
    for _, s in ipairs { "", "f", "fo", "foo", "\0\255\1" } do
      assert.are.equal(s, crypto.base64_decode(crypto.base64_encode(s)))
    end
    local ok, err, code = crypto.base64_decode("Zm9v!")
    assert.is_nil(ok)
    assert.are.equal("EINVAL", code)
    assert.matches("base64", err)
  end)

  it("compares in constant time and xors equal lengths only", function()
    assert.is_true(crypto.equal("abc", "abc"))
    assert.is_false(crypto.equal("abc", "abd"))
    assert.is_false(crypto.equal("abc", "ab"))
    assert.are.equal("\3\3", crypto.xor("\1\2", "\2\1"))
    assert.has_error(function() crypto.xor("a", "ab") end)
    assert.has_error(function() crypto.hmac("md5", "k", "d") end)
  end)
end)
