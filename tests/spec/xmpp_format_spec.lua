-- segue.xmpp_format: XEP-0393 message styling to and from MessageContent,
-- JIDs, XEP-0082 stamps and text cleaning for the XMPP backend.
local f = require "segue.xmpp_format"

local function T(s) return { type = "Text", value = s } end
local function C(...) return { type = "Concat", value = { ... } } end

describe("segue.xmpp_format styling", function()
  it("reads bold, italic, strike and URLs as content nodes", function()
    assert.are.same(C(T("a "), { type = "Bold", value = T("big") }, T(" and "),
      { type = "Italic", value = T("slanted") }, T(" "), { type = "Crossout", value = T("gone") },
      T(" see "), { type = "UrlLink", value = "https://example.org/x?y=1" }, T(".")),
      f.from_styling("a *big* and _slanted_ ~gone~ see https://example.org/x?y=1."))
  end)

  it("nests spans and keeps code, quotes and unclosed markers as written", function()
    assert.are.same({ type = "Bold", value = C(T("very "), { type = "Italic", value = T("much") }) },
      f.from_styling("*very _much_*"))
    assert.are.same(T("`*not bold*` 2 * 3 * 4 and a_b_c"), f.from_styling("`*not bold*` 2 * 3 * 4 and a_b_c"))
    assert.are.same(C(T("> quoted "), { type = "Bold", value = T("text") }, T("\nnext")),
      f.from_styling("> quoted *text*\nnext"))
    assert.are.same(T("```\n*pre*\n```"), f.from_styling("```\n*pre*\n```"))
    assert.are.same(T("*no\nspan*"), f.from_styling("*no\nspan*"))
  end)

  it("reads /me as an emote", function()
    assert.are.same({ type = "Emote", value = "waves" }, f.from_styling("/me waves"))
  end)

  it("writes content as styling, with markers touching the text", function()
    local content = C(T("hi "), { type = "Bold", value = T("there ") }, { type = "Italic", value = T("you") },
      T(" "), { type = "Underline", value = T("u") }, T(" "), { type = "Crossout", value = T("x") },
      T(" "), { type = "UrlLink", value = "https://a.example/" })
    assert.are.equal("hi *there* _you_ u ~x~ https://a.example/", f.to_styling(content))
    assert.are.equal("/me waves", f.to_styling { type = "Emote", value = "waves" })
    assert.are.equal("*a*\n*b*", f.to_styling { type = "Bold", value = T("a\nb") })
  end)

  it("round-trips what it writes", function()
    local content = C(T("x "), { type = "Bold", value = T("y") }, T(" "), { type = "Crossout", value = T("z") })
    assert.are.same(content, f.from_styling(f.to_styling(content)))
  end)
end)

describe("segue.xmpp_format helpers", function()
  it("splits and bares JIDs", function()
    assert.are.same({ "room", "conference.example.org", "Nick/x" }, { f.split("room@conference.example.org/Nick/x") })
    assert.are.equal("room@conference.example.org", f.bare("Room@Conference.Example.org/Nick"))
    assert.is_nil(f.bare("@example.org"))
    assert.is_nil(f.bare("a@"))
  end)

  it("reads XEP-0082 stamps in UTC, with fractions and offsets", function()
    assert.are.equal(0, f.stamp_ms("1970-01-01T00:00:00Z"))
    assert.are.equal(1764165900123, f.stamp_ms("2025-11-26T14:05:00.123Z"))
    assert.are.equal(1764165900000, f.stamp_ms("2025-11-26T15:05:00+01:00"))
    assert.is_nil(f.stamp_ms("yesterday"))
  end)

  it("cleans text for XML", function()
    assert.are.equal("ab\ncd\u{FFFD}e", f.clean("a\1b\r\nc\27d\xffe"))
  end)
end)
