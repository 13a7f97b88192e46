-- segue.sasl: the SCRAM exchanges printed in RFC 5802 section 5 (SHA-1) and
-- RFC 7677 section 3 (SHA-256), byte for byte, and the checks that refuse a
-- server that does not know the password.
local sasl = require "segue.sasl"

describe("segue.sasl", function()
  it("computes RFC 5802's SCRAM-SHA-1 exchange and accepts the server's proof", function()
    local s = sasl.scram("sha1", "user", "pencil", "fyko+d2lbbFgONRv9qkxdawL")
    assert.are.equal("n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL", s:first())
    local final = s:final("r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert.are.equal("c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", final)
    assert.is_true(s:verify("v=rmF9pqV8S7suAoZWja4dJRkFsKQ="))
  end)

  it("computes RFC 7677's SCRAM-SHA-256 exchange", function()
    local s = sasl.scram("sha256", "user", "pencil", "rOprNGfwEbeRWgbNEkqO")
    local final = s:final("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert.are.equal("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
      .. "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", final)
    assert.is_true(s:verify("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
  end)

  it("refuses a wrong server signature, a nonce that does not extend ours, and absurd iteration counts", function()
    local s = sasl.scram("sha1", "user", "pencil", "abc")
    assert.is_truthy(s:final("r=abcdef,s=QSXCR+Q6sek8bf92,i=4096"))
    local ok, err = s:verify("v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
    assert.is_nil(ok)
    assert.matches("signature is wrong", err)
    assert.is_nil((sasl.scram("sha1", "u", "p", "abc"):final("r=xyz123,s=QSXCR+Q6sek8bf92,i=4096")))
    assert.is_nil((sasl.scram("sha1", "u", "p", "abc"):final("r=abcd,s=QSXCR+Q6sek8bf92,i=999999999")))
    local _, e = sasl.scram("sha1", "u", "p", "abc"):final("r=abcd,s=QSXCR+Q6sek8bf92,i=1,m=ext")
    assert.matches("extension", e)
    local ok2, err2 = sasl.scram("sha1", "u", "p", "abc"):verify("e=invalid-proof")
    assert.is_nil(ok2)
    assert.matches("invalid%-proof", err2)
  end)

  it("escapes = and , in the username and builds PLAIN", function()
    assert.are.equal("n,,n=a=3Db=2Cc,r=N", sasl.scram("sha1", "a=b,c", "p", "N"):first())
    assert.are.equal("\0me\0secret", sasl.plain("me", "secret"))
  end)
end)
