-- The IRC backend's pure half: lines, case mapping, formatting, splitting.
local f = require "segue.irc_format"

local function text(s) return { type = "Text", value = s } end

describe("IRC line parsing", function()
  it("reads tags, source, command and a trailing parameter", function()
    local m = f.parse("@time=x :nick!user@host.example PRIVMSG #chan :hello world")
    assert.are.same({ "#chan", "hello world" }, m.params)
    assert.are.equal("time=x", m.tags)
    assert.are.equal("nick", m.nick)
    assert.are.equal("user", m.user)
    assert.are.equal("host.example", m.host)
    assert.are.equal("PRIVMSG", m.command)
  end)

  it("reads a command without a source and a numeric reply", function()
    assert.are.same({ "irc.test" }, f.parse("PING :irc.test").params)
    local m = f.parse(":irc.test 433 * wanted :Nickname already in use")
    assert.are.equal("433", m.command)
    assert.are.same({ "*", "wanted", "Nickname already in use" }, m.params)
  end)

  it("refuses a line without a command", function()
    local m, err = f.parse(":only.a.source")
    assert.is_nil(m)
    assert.matches("without a command", err)
  end)

  it("builds lines with a colon only where the last parameter needs it", function()
    assert.are.equal("NICK me", f.line("NICK", "me"))
    assert.are.equal("PRIVMSG #a :hi there", f.line("PRIVMSG", "#a", "hi there"))
    assert.are.equal("PRIVMSG #a ::)", f.line("PRIVMSG", "#a", ":)"))
  end)

  it("refuses parameters that would inject another line", function()
    assert.has_error(function() f.line("PRIVMSG", "#a", "hi\r\nQUIT") end)
    assert.has_error(function() f.line("PRIVMSG", "#a b", "hi") end)
  end)

  it("compares names with the RFC 1459 case mapping", function()
    assert.are.equal("#foo{}|^", f.lower("#Foo[]\\~"))
    assert.is_true(f.is_channel("#a"))
    assert.is_false(f.is_channel("nick"))
    assert.is_false(f.is_channel("#a b"))
  end)

  it("recognises a CTCP ACTION", function()
    assert.are.same({ "ACTION", "waves" }, { f.ctcp("\1ACTION waves\1") })
    assert.is_nil(f.ctcp("plain"))
  end)
end)

describe("MessageContent to IRC", function()
  it("renders bold, italic, underline and strikethrough as their codes", function()
    local c = { type = "Concat", value = {
      { type = "Bold", value = text("b") }, { type = "Italic", value = text("i") },
      { type = "Underline", value = text("u") }, { type = "Crossout", value = text("s") } } }
    assert.are.equal("\2b\2\29i\29\31u\31\30s\30", (f.to_irc(c)))
  end)

  it("does not toggle a style off by nesting it twice", function()
    local c = { type = "Bold", value = { type = "Concat", value = { text("a"), { type = "Bold", value = text("b") } } } }
    assert.are.equal("\2ab\2", (f.to_irc(c)))
  end)

  it("renders links as their text and a top-level Emote as an action", function()
    local c = { type = "Concat", value = { text("see "), { type = "UrlLink", value = "https://x.example" },
      text(" by "), { type = "UserLink", value = "alice" } } }
    assert.are.equal("see https://x.example by alice", (f.to_irc(c)))
    assert.are.same({ "waves", true }, { f.to_irc({ type = "Emote", value = "waves" }) })
  end)

  it("strips control codes from text so a message cannot become CTCP", function()
    assert.are.equal("VERSION", (f.to_irc(text("\1VERSION\1"))))
  end)
end)

describe("IRC to MessageContent", function()
  it("turns formatting codes into nodes and drops colours", function()
    local c = f.from_irc("\2bold\2 plain \0034,12red\3 \29it")
    assert.are.same({ type = "Concat", value = {
      { type = "Bold", value = text("bold") },
      text(" plain red "),
      { type = "Italic", value = text("it") } } }, c)
  end)

  it("makes URLs links without their trailing punctuation", function()
    assert.are.same({ type = "Concat", value = {
      text("see "), { type = "UrlLink", value = "https://example.org/a" }, text(".") } },
      f.from_irc("see https://example.org/a."))
  end)

  it("keeps plain text plain", function()
    assert.are.same(text("hello"), f.from_irc("hello"))
  end)

  it("strips every code for plain text such as an Emote", function()
    assert.are.equal("waves red hand", f.strip("\2waves\2 \0034,12red\3 \29hand"))
  end)

  it("resets every style at \\x0f", function()
    assert.are.same({ type = "Concat", value = { { type = "Bold", value = { type = "Italic", value = text("x") } }, text("y") } },
      f.from_irc("\2\29x\15y"))
  end)
end)

describe("splitting into IRC lines", function()
  it("never cuts a UTF-8 character and keeps every line within the limit", function()
    local s = string.rep("é", 100)  -- 200 bytes
    local lines = f.split_lines(s, 33)
    for _, l in ipairs(lines) do
      assert.is_true(#l <= 33)
      assert.is_truthy(utf8.len(l))
    end
    assert.are.equal(s, table.concat(lines))
  end)

  it("prefers to cut at a space in the second half of the line", function()
    assert.are.same({ "aaaaaaa bbbbbbbb", "cccc" }, f.split_lines("aaaaaaa bbbbbbbb cccc", 20))
  end)

  it("reopens formatting that was active at the cut", function()
    local lines = f.split_lines("\2" .. string.rep("x", 30), 20)
    assert.are.equal("\2" .. string.rep("x", 19), lines[1])
    assert.are.equal("\2" .. string.rep("x", 11), lines[2])
  end)

  it("cuts at newlines and drops empty lines", function()
    assert.are.same({ "a", "b", "c" }, f.split_lines("a\nb\n\n\2\2\nc", 40))
  end)

  it("leaves room for the prefix the server adds when it relays", function()
    local n = f.budget(#"nick!user@host", "PRIVMSG", "#chan", false)
    assert.are.equal(512 - 2 - #":nick!user@host " - #"PRIVMSG #chan :", n)
    assert.are.equal(n - 9, f.budget(#"nick!user@host", "PRIVMSG", "#chan", true))
  end)
end)

describe("IRCv3 message tags and server times", function()
  it("reads tags with their escapes and tags without a value", function()
    local t = f.tags("msgid=abc;time=2026-11-26T14:49:24.277Z;+draft/reply=x\\sy\\:z\\\\;flag")
    assert.are.same({ msgid = "abc", time = "2026-11-26T14:49:24.277Z", ["+draft/reply"] = "x y;z\\", flag = "" }, t)
    assert.are.same({}, f.tags(nil))
  end)

  it("turns a server time into milliseconds since the epoch, in UTC", function()
    assert.are.equal(0, f.parse_time("1970-01-01T00:00:00.000Z"))
    assert.are.equal(951782400000, f.parse_time("2000-02-29T00:00:00Z"))
    assert.are.equal(1795704564277, f.parse_time("2026-11-26T14:49:24.277Z"))
    assert.are.equal(1795704564200, f.parse_time("2026-11-26T14:49:24.2Z"))
  end)

  it("refuses a time that is not an IRCv3 server time", function()
    assert.is_nil(f.parse_time("2026-11-26 14:49:24"))
    assert.is_nil(f.parse_time("2026-13-01T00:00:00Z"))
    assert.is_nil(f.parse_time(nil))
  end)
end)
