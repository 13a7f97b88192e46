-- segue.xml: the streaming reader (expat) fed the way a socket delivers
-- bytes, and the serializer's escaping, checked by parsing its output again.
local xml = require "segue.xml"

local STREAM = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
  .. "xmlns:stream='http://etherx.jabber.org/streams' id='s1' version='1.0'>"

-- Feeds `text` in pieces of `step` bytes; all items, or nil, err, code.
local function feed_all(p, text, step)
  local all = {}
  for i = 1, #text, step do
    local items, err, code = p:feed(text:sub(i, i + step - 1))
    if not items then return nil, err, code end
    for _, it in ipairs(items) do all[#all + 1] = it end
  end
  return all
end

describe("segue.xml parser", function()
  it("yields the stream header, each stanza whole, and the stream end, whatever the pieces", function()
    local doc = STREAM .. "<message to='bob@example.org' type='chat' xml:lang='en'>"
      .. "<body>fish &amp; chips &lt;3 &#x1F41F;</body><active xmlns='http://jabber.org/protocol/chatstates'/>"
      .. "</message>\n <iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
    for _, step in ipairs { 1, 3, 17, #doc } do
      local items = assert(feed_all(xml.parser(), doc, step))
      assert.are.equal(4, #items)
      assert.are.same({ name = "stream", ns = "http://etherx.jabber.org/streams", stream = "open",
        attrs = { id = "s1", version = "1.0" } }, items[1])
      local m = items[2]
      assert.are.equal("message", m.name)
      assert.are.equal("jabber:client", m.ns)
      assert.are.same({ to = "bob@example.org", type = "chat", ["xml:lang"] = "en" }, m.attrs)
      assert.are.equal("body", m[1].name)
      assert.are.equal("fish & chips <3 \u{1F41F}", m[1].text)
      assert.are.equal("http://jabber.org/protocol/chatstates", m[2].ns)
      assert.are.equal("urn:xmpp:ping", items[3][1].ns)
      assert.are.same({ name = "stream", ns = "http://etherx.jabber.org/streams", stream = "close" }, items[4])
    end
  end)

  it("answers a stanza as soon as its end tag arrives, before the stream ends", function()
    local p = xml.parser()
    assert.are.equal(1, #assert(p:feed(STREAM)))
    assert.are.same({}, assert(p:feed("<presence><show>away</show>")))
    local items = assert(p:feed("</presence>"))
    assert.are.equal("presence", items[1].name)
    assert.are.equal("away", items[1][1].text)
  end)

  it("resolves prefixed element and attribute namespaces", function()
    local items = assert(xml.parser():feed("<r xmlns:a='urn:a'><a:x a:k='v' k='w'/></r>"))
    assert.are.equal("urn:a", items[2].ns)
    assert.are.equal("x", items[2].name)
    assert.are.same({ ["{urn:a}k"] = "v", k = "w" }, items[2].attrs)
  end)

  it("refuses malformed XML with the reason and the line", function()
    local p = xml.parser()
    local ok, err, code = feed_all(p, STREAM .. "\n<message><body></message>", 5)
    assert.is_nil(ok)
    assert.are.equal("EPROTO", code)
    assert.matches("^EPROTO: XML: mismatched tag at line 2", err)
    -- and stays failed
    local again, err2 = p:feed("<x/>")
    assert.is_nil(again)
    assert.are.equal(err, err2)
  end)

  it("refuses a DOCTYPE and entity declarations (no entity expansion)", function()
    local bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><lolz>&lol2;</lolz>"
    local ok, err, code = xml.parser():feed(bomb)
    assert.is_nil(ok)
    assert.are.equal("EPROTO", code)
    assert.matches("DOCTYPE", err)
    local ok2, err2 = xml.parser():feed("<a>&undefined;</a>")
    assert.is_nil(ok2)
    assert.matches("undefined entity", err2)
  end)

  it("enforces the depth limit", function()
    local ok, err, code = xml.parser { max_depth = 4 }:feed("<s><a><b><c><d/></c></b></a></s>")
    assert.is_nil(ok)
    assert.are.equal("ELIMIT", code)
    assert.matches("max_depth %(4%)", err)
    assert.is_truthy(xml.parser { max_depth = 4 }:feed("<s><a><b><c/></b></a></s>"))
  end)

  it("enforces the size limit on a stanza's text, on a huge tag and on a stanza that never ends", function()
    local function limited(text)
      local ok, err, code = feed_all(xml.parser { max_size = 1000 }, text, 300)
      assert.is_nil(ok)
      assert.are.equal("ELIMIT", code)
      assert.matches("max_size", err)
    end
    limited("<s><m>" .. ("x"):rep(2000) .. "</m></s>")
    limited("<s><m a='" .. ("x"):rep(5000))
    limited("<s><m>" .. ("<b/>"):rep(1000))
    -- many small stanzas are fine: the limit is per stanza
    local items = assert(feed_all(xml.parser { max_size = 1000 }, "<s>" .. ("<m>" .. ("y"):rep(500) .. "</m>"):rep(50), 97))
    assert.are.equal(51, #items)
  end)

  it("finish() tells a complete document from a cut one", function()
    local p = xml.parser()
    assert.is_truthy(p:feed("<a><b/></a>"))
    assert.is_truthy(p:finish())
    local q = xml.parser()
    assert.is_truthy(q:feed("<a><b>"))
    local ok, _, code = q:finish()
    assert.is_nil(ok)
    assert.are.equal("EPROTO", code)
  end)
end)

describe("segue.xml serializer", function()
  it("escapes text and attributes so that parsing gives the same strings back", function()
    local nasty = "a & b < c > d \" e ' f ]]> g\r\nh \u{1F600}"
    local el = { name = "message", ns = "jabber:client", attrs = { to = nasty, id = "1" },
      { name = "body", text = nasty }, { name = "x", ns = "urn:other", attrs = { ["xml:lang"] = "en" } } }
    local text = assert(xml.serialize(el))
    assert.is_nil(text:find("<c", 1, true))
    local items = assert(xml.parser():feed("<root xmlns='jabber:client'>" .. text .. "</root>"))
    local back = items[2]
    assert.are.equal(nasty, back.attrs.to)
    assert.are.equal(nasty, back[1].text)
    assert.are.equal("jabber:client", back[1].ns)
    assert.are.equal("urn:other", back[2].ns)
    assert.are.equal("en", back[2].attrs["xml:lang"])
  end)

  it("writes attributes in sorted order and empty elements short", function()
    assert.are.equal('<iq xmlns="jabber:client" id="a" to="b" type="get"><ping xmlns="urn:xmpp:ping"/></iq>',
      xml.serialize { name = "iq", ns = "jabber:client", attrs = { type = "get", to = "b", id = "a" },
        { name = "ping", ns = "urn:xmpp:ping" } })
  end)

  it("refuses control characters, invalid UTF-8 and bad names, naming where", function()
    local ok, err, code = xml.serialize { name = "body", text = "bell\7" }
    assert.is_nil(ok)
    assert.are.equal("EINVAL", code)
    assert.matches("text of element body: byte 5", err)
    assert.is_nil((xml.serialize { name = "a", attrs = { k = "\xff" } }))
    assert.is_nil((xml.serialize { name = "a", text = "\xed\xa0\x80" }))  -- a UTF-16 surrogate
    assert.is_nil((xml.serialize { name = "a b" }))
    assert.is_nil((xml.serialize { name = "a", attrs = { ["x y"] = "1" } }))
    assert.is_nil((xml.serialize { name = "a", { name = "b", "not a table" } }))
  end)

  it("escape() escapes the five special characters", function()
    assert.are.equal("&lt;a href=&quot;x&quot;&gt;&amp;&apos;", xml.escape("<a href=\"x\">&'"))
  end)
end)

describe("segue.xml round trip", function()
  it("keeps a namespaced attribute whose namespace URI holds a brace (found by fuzz_xml)", function()
    local items = assert(xml.parser():feed("<r xmlns:a='}rn:a'><a:x a:k='v'/></r>"))
    assert.are.same({ ["{}rn:a}k"] = "v" }, items[2].attrs)
    local back = assert(xml.parser():feed("<r>" .. assert(xml.serialize(items[2])) .. "</r>"))
    assert.are.same(items[2].attrs, back[2].attrs)
  end)
end)
