/* segue.xml: a streaming XML reader over expat for stream protocols (XMPP),
 * and a serializer that escapes. Translation only: expat parses; this file
 * turns its events into Lua tables.
 *
 *   local p = xml.parser { max_depth = 32, max_size = 1048576 }
 *   local items, err, code = p:feed(bytes)   -- as the bytes arrive
 *
 * `feed` answers an array (maybe empty) of what completed in those bytes:
 *   - the root's start tag: { name, ns, attrs, stream = "open" }
 *   - each complete child of the root (a stanza), as an element:
 *     { name = "message", ns = "jabber:client", attrs = { to = "..." },
 *       text = "direct character data" or nil, [1] = child, [2] = ... }
 *   - the root's end tag: { name, ns, stream = "close" }
 * Namespaces are resolved (`ns` is the URI or "", `name` the local name; prefixed
 * attributes are "xml:lang" or "{uri}local"). Limits: `max_depth` nested
 * elements (root included; 32), `max_size` bytes of input and of strings per
 * top-level element (1 MiB). Malformed input, a DOCTYPE or entity
 * declaration (XMPP forbids them; no entity expansion attacks) give
 * nil, "EPROTO: XML: <reason> at line L, column C", "EPROTO"; a limit gives
 * ELIMIT. A failure is sticky: that parser answers it to every later feed.
 * p:finish() says whether the input ended cleanly (for a whole document).
 *
 *   xml.serialize(element) -> text | nil, "EINVAL: ...", "EINVAL"
 * writes an element table of the same shape (ns = nil inherits the parent's;
 * a different ns is declared with xmlns), attributes in sorted order, text
 * before the children. Text and attribute values must be UTF-8 made of XML
 * characters (no control characters but tab, LF, CR): the failure names the
 * element and byte. xml.escape(text) escapes & < > " ' for hand-made tags. */
#include <expat.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"

#define PARSER_MT "segue.xml.parser"
#define NS_SEP '\x01' /* not an XML character, so never inside a URI or name */
#define XML_NS "http://www.w3.org/XML/1998/namespace"
#define DEFAULT_MAX_DEPTH 32
#define DEFAULT_MAX_SIZE ((size_t)1 << 20)
#define ELEMENT_OVERHEAD 64 /* counted per element against max_size */
#define SERIALIZE_MAX_DEPTH 64

typedef struct {
  XML_Parser p;
  lua_State *L;         /* during feed only */
  int results;          /* stack index of the results array during feed */
  int chain;            /* stack index of the open elements during feed: the
                         * userdata's user value, chain[d - 1] at depth d >= 2,
                         * so elements survive between feeds */
  int depth;            /* open elements, the root included */
  int busy;             /* inside XML_Parse: a Lua error escaping it kills the parser */
  int failed;           /* SG_E* once failed */
  size_t max_depth, max_size;
  size_t size;          /* strings of the current top-level element */
  unsigned long long fed, top_start;
  char *text;           /* character data of the innermost open element */
  size_t text_len, text_cap;
  char error[300];
} xparser;

/* ---- parsing --------------------------------------------------------------- */

static void fail(xparser *x, int code, const char *fmt, const char *arg) {
  if (x->failed) return;
  x->failed = code;
  char what[200];
  snprintf(what, sizeof what, fmt, arg ? arg : "");
  snprintf(x->error, sizeof x->error, "XML: %s at line %lu, column %lu", what,
           (unsigned long)XML_GetCurrentLineNumber(x->p),
           (unsigned long)XML_GetCurrentColumnNumber(x->p) + 1);
  XML_StopParser(x->p, XML_FALSE);
}

static int charge(xparser *x, size_t n) {
  x->size += n;
  if (x->size <= x->max_size) return 1;
  char lim[40];
  snprintf(lim, sizeof lim, "%zu", x->max_size);
  fail(x, SG_ELIMIT, "an element is larger than max_size (%s bytes)", lim);
  return 0;
}

static void append_result(xparser *x) {
  lua_rawseti(x->L, x->results, (lua_Integer)lua_rawlen(x->L, x->results) + 1);
}

/* Sets name and ns on the table at the top from an expat name; ns is ""
 * for an element in no namespace (nil would mean "the parent's" to the
 * serializer). */
static void set_name(lua_State *L, const char *name) {
  const char *sep = strchr(name, NS_SEP);
  if (sep) {
    lua_pushlstring(L, name, (size_t)(sep - name));
    name = sep + 1;
  } else {
    lua_pushliteral(L, "");
  }
  lua_setfield(L, -2, "ns");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
}

static void push_attr_name(lua_State *L, const char *name) {
  const char *sep = strchr(name, NS_SEP);
  if (!sep) {
    lua_pushstring(L, name);
  } else if ((size_t)(sep - name) == sizeof XML_NS - 1 && memcmp(name, XML_NS, sizeof XML_NS - 1) == 0) {
    lua_pushfstring(L, "xml:%s", sep + 1);
  } else {
    lua_pushliteral(L, "{");
    lua_pushlstring(L, name, (size_t)(sep - name));
    lua_pushliteral(L, "}");
    lua_pushstring(L, sep + 1);
    lua_concat(L, 4);
  }
}

/* Moves the buffered character data into the `text` of the innermost open
 * element (depth >= 2). */
static void flush_text(xparser *x) {
  if (x->text_len == 0) return;
  lua_State *L = x->L;
  lua_rawgeti(L, x->chain, x->depth - 1);
  if (lua_getfield(L, -1, "text") == LUA_TSTRING) {
    lua_pushlstring(L, x->text, x->text_len);
    lua_concat(L, 2);
  } else {
    lua_pop(L, 1);
    lua_pushlstring(L, x->text, x->text_len);
  }
  lua_setfield(L, -2, "text");
  lua_pop(L, 1);
  x->text_len = 0;
}

static void XMLCALL on_start(void *ud, const XML_Char *name, const XML_Char **atts) {
  xparser *x = ud;
  lua_State *L = x->L;
  if (x->failed) return;
  if ((size_t)++x->depth > x->max_depth) {
    char lim[24];
    snprintf(lim, sizeof lim, "%zu", x->max_depth);
    return fail(x, SG_ELIMIT, "elements nested deeper than max_depth (%s)", lim);
  }
  if (!lua_checkstack(L, 8)) return fail(x, SG_ENOMEM, "out of Lua stack%s", NULL);
  if (x->depth == 2) {
    x->size = 0;
    x->top_start = (unsigned long long)XML_GetCurrentByteIndex(x->p);
  } else if (x->depth > 2) {
    x->depth--;
    flush_text(x);
    x->depth++;
  }
  size_t n = ELEMENT_OVERHEAD + strlen(name);
  lua_newtable(L);
  set_name(L, name);
  lua_newtable(L);
  for (int i = 0; atts[i]; i += 2) {
    n += strlen(atts[i]) + strlen(atts[i + 1]) + 16;
    push_attr_name(L, atts[i]);
    lua_pushstring(L, atts[i + 1]);
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "attrs");
  if (x->depth == 1) {
    lua_pushliteral(L, "open");
    lua_setfield(L, -2, "stream");
    append_result(x);
    return;
  }
  lua_rawseti(L, x->chain, x->depth - 1);
  charge(x, n);
}

static void XMLCALL on_end(void *ud, const XML_Char *name) {
  xparser *x = ud;
  lua_State *L = x->L;
  if (x->failed) return;
  int depth = x->depth;
  if (depth == 1) {
    x->depth--;
    lua_newtable(L);
    set_name(L, name);
    lua_pushliteral(L, "close");
    lua_setfield(L, -2, "stream");
    append_result(x);
    return;
  }
  flush_text(x);
  x->depth--;
  lua_rawgeti(L, x->chain, depth - 1);
  lua_pushnil(L);
  lua_rawseti(L, x->chain, depth - 1);
  if (depth == 2) {
    append_result(x);
  } else {
    lua_rawgeti(L, x->chain, depth - 2);
    lua_insert(L, -2);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 1);
  }
}

static void XMLCALL on_text(void *ud, const XML_Char *s, int len) {
  xparser *x = ud;
  if (x->failed || x->depth < 2 || len <= 0) return;  /* whitespace between stanzas */
  if (!charge(x, (size_t)len)) return;
  if (x->text_len + (size_t)len > x->text_cap) {
    size_t cap = x->text_cap ? x->text_cap : 256;
    while (cap < x->text_len + (size_t)len) cap *= 2;
    char *t = realloc(x->text, cap);
    if (!t) return fail(x, SG_ENOMEM, "out of memory%s", NULL);
    x->text = t;
    x->text_cap = cap;
  }
  memcpy(x->text + x->text_len, s, (size_t)len);
  x->text_len += (size_t)len;
}

static void XMLCALL on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid,
                               const XML_Char *pubid, int has_internal_subset) {
  fail(ud, SG_EPROTO, "a DOCTYPE is not allowed%s", NULL);
}

static void XMLCALL on_entity(void *ud, const XML_Char *name, int is_param, const XML_Char *value,
                              int value_len, const XML_Char *base, const XML_Char *sysid,
                              const XML_Char *pubid, const XML_Char *notation) {
  fail(ud, SG_EPROTO, "an entity declaration is not allowed%s", NULL);
}

static xparser *check_parser(lua_State *L) {
  xparser *x = luaL_checkudata(L, 1, PARSER_MT);
  if (!x->p) luaL_argerror(L, 1, "parser is closed");
  return x;
}

static int push_failure(lua_State *L, xparser *x) {
  return sg__lua_fail(L, x->failed, x->error);
}

/* Runs expat on data (final: the end of input); results or a failure. */
static int run(lua_State *L, xparser *x, const char *data, size_t len, int final) {
  if (x->failed) return push_failure(L, x);
  if (x->busy) {
    x->failed = SG_EPROTO;
    snprintf(x->error, sizeof x->error, "XML: the parser was interrupted by an error and cannot go on");
    return push_failure(L, x);
  }
  lua_settop(L, 2);
  lua_getiuservalue(L, 1, 1);
  x->chain = lua_gettop(L);
  lua_newtable(L);
  x->L = L;
  x->results = lua_gettop(L);
  x->busy = 1;
  /* expat takes an int length: feed in slices. */
  enum XML_Status st = XML_STATUS_OK;
  do {
    size_t n = len > (1 << 30) ? (1 << 30) : len;
    st = XML_Parse(x->p, data, (int)n, final && n == len);
    data += n;
    len -= n;
    x->fed += n;
  } while (st == XML_STATUS_OK && len > 0);
  x->busy = 0;
  x->L = NULL;
  if (st != XML_STATUS_OK && !x->failed) {
    x->failed = SG_EPROTO;
    snprintf(x->error, sizeof x->error, "XML: %s at line %lu, column %lu",
             XML_ErrorString(XML_GetErrorCode(x->p)), (unsigned long)XML_GetCurrentLineNumber(x->p),
             (unsigned long)XML_GetCurrentColumnNumber(x->p) + 1);
  }
  if (x->failed) return push_failure(L, x);
  /* What expat holds unparsed (a huge start tag, a stanza that never ends)
   * counts too, so memory stays bounded by max_size plus one feed. */
  unsigned long long since = x->depth >= 2 ? x->top_start : (unsigned long long)XML_GetCurrentByteIndex(x->p);
  if (x->fed > since && x->fed - since > x->max_size) {
    x->failed = SG_ELIMIT;
    snprintf(x->error, sizeof x->error, "XML: an element is larger than max_size (%zu bytes)", x->max_size);
    return push_failure(L, x);
  }
  lua_settop(L, x->results);
  return 1;
}

/* p:feed(bytes) -> items | nil, err, code */
static int l_feed(lua_State *L) {
  xparser *x = check_parser(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  return run(L, x, data, len, 0);
}

/* p:finish() -> items | nil, err, code: the input ends here; incomplete
 * input (an unclosed tag) is a failure. */
static int l_finish(lua_State *L) {
  xparser *x = check_parser(L);
  return run(L, x, "", 0, 1);
}

static int l_depth(lua_State *L) {
  lua_pushinteger(L, check_parser(L)->depth);
  return 1;
}

static int l_gc(lua_State *L) {
  xparser *x = luaL_checkudata(L, 1, PARSER_MT);
  if (x->p) XML_ParserFree(x->p);
  x->p = NULL;
  free(x->text);
  x->text = NULL;
  return 0;
}

static size_t opt_limit(lua_State *L, const char *key, size_t dflt) {
  if (lua_type(L, 1) != LUA_TTABLE) return dflt;
  lua_getfield(L, 1, key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  lua_Integer v = lua_tointeger(L, -1);
  if (v <= 0) luaL_error(L, "segue.xml.parser: option %s must be a positive integer", key);
  lua_pop(L, 1);
  return (size_t)v;
}

/* parser([options]) -> a new parser */
static int l_parser(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
  size_t max_depth = opt_limit(L, "max_depth", DEFAULT_MAX_DEPTH);
  size_t max_size = opt_limit(L, "max_size", DEFAULT_MAX_SIZE);
  luaL_argcheck(L, max_depth <= 1000, 1, "max_depth is at most 1000");
  xparser *x = lua_newuserdatauv(L, sizeof *x, 1);
  memset(x, 0, sizeof *x);
  luaL_setmetatable(L, PARSER_MT);
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);
  x->max_depth = max_depth;
  x->max_size = max_size;
  x->p = XML_ParserCreateNS("UTF-8", NS_SEP);
  if (!x->p) return luaL_error(L, "out of memory");
  XML_SetUserData(x->p, x);
  XML_SetElementHandler(x->p, on_start, on_end);
  XML_SetCharacterDataHandler(x->p, on_text);
  XML_SetStartDoctypeDeclHandler(x->p, on_doctype);
  XML_SetEntityDeclHandler(x->p, on_entity);
  XML_SetParamEntityParsing(x->p, XML_PARAM_ENTITY_PARSING_NEVER);
  return 1;
}

/* ---- serializing ---------------------------------------------------------- */

/* Output grows in C memory owned by a userdata (freed by __gc), because a
 * luaL_Buffer must stay on top of the stack and the writer walks tables. */
typedef struct {
  char *data;
  size_t len, cap;
} strbuf;

typedef struct {
  lua_State *L;
  strbuf *b;
  char error[200];
  int in_attr;
} writer;

#define STRBUF_MT "segue.xml.strbuf"

static void sb_add(writer *w, const char *s, size_t n) {
  strbuf *b = w->b;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) luaL_error(w->L, "out of memory");
    b->data = d;
    b->cap = cap;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
}

static void sb_str(writer *w, const char *s) { sb_add(w, s, strlen(s)); }
static void sb_char(writer *w, char c) { sb_add(w, &c, 1); }

static int sb_gc(lua_State *L) {
  strbuf *b = luaL_checkudata(L, 1, STRBUF_MT);
  free(b->data);
  b->data = NULL;
  return 0;
}

static strbuf *sb_new(lua_State *L) {
  strbuf *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, STRBUF_MT);
  return b;
}

/* Length of the valid UTF-8 XML character at s (n bytes left), or 0. */
static size_t xml_char(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  unsigned cp;
  if (c < 0x80) {
    return (c >= 0x20 || c == 0x9 || c == 0xA || c == 0xD) ? 1 : 0;
  } else if (c >= 0xC2 && c <= 0xDF) {
    len = 2, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3, cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (n < len) return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3F);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
  if ((cp >= 0xD800 && cp <= 0xDFFF) || cp == 0xFFFE || cp == 0xFFFF) return 0;
  return len;
}

/* Appends s escaped; 0 (and w->error) at a byte that is not an XML character. */
static int add_escaped(writer *w, const char *s, size_t n, const char *what) {
  /* In attributes a literal CR, LF or tab would be normalized to a space by
   * the reader: they are written as references. */
  const unsigned char *u = (const unsigned char *)s;
  size_t i = 0;
  while (i < n) {
    size_t k = xml_char(u + i, n - i);
    if (k == 0) {
      snprintf(w->error, sizeof w->error, "%s: byte %zu (0x%02x) is not a UTF-8 XML character", what,
               i + 1, u[i]);
      return 0;
    }
    const char *rep = NULL;
    switch (u[i]) {
      case '&': rep = "&amp;"; break;
      case '<': rep = "&lt;"; break;
      case '>': rep = "&gt;"; break;
      case '"': rep = "&quot;"; break;
      case '\'': rep = "&apos;"; break;
      case '\r': rep = "&#13;"; break;
      case '\n': rep = w->in_attr ? "&#10;" : NULL; break;
      case '\t': rep = w->in_attr ? "&#9;" : NULL; break;
      default: break;
    }
    if (rep) sb_str(w, rep);
    else sb_add(w, s + i, k);
    i += k;
  }
  return 1;
}

static int valid_name(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= 0x20 || strchr("<>&\"'=/!?{}", c)) return 0;
  }
  return !(s[0] == '-' || s[0] == '.' || (s[0] >= '0' && s[0] <= '9'));
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Writes the element at the top of the stack (left there). */
static int write_element(writer *w, const char *parent_ns, int depth) {
  lua_State *L = w->L;
  int el = lua_gettop(L);
  if (depth > SERIALIZE_MAX_DEPTH) {
    snprintf(w->error, sizeof w->error, "elements nested deeper than %d", SERIALIZE_MAX_DEPTH);
    return 0;
  }
  if (!lua_istable(L, el)) {
    snprintf(w->error, sizeof w->error, "a child is a %s, not an element table", luaL_typename(L, el));
    return 0;
  }
  luaL_checkstack(L, 10, "serialize");
  lua_getfield(L, el, "name");
  size_t nlen;
  const char *name = lua_tolstring(L, -1, &nlen);
  if (!name || !valid_name(name, nlen) || strchr(name, ':')) {
    snprintf(w->error, sizeof w->error, "element name %s is not a valid local name",
             name ? name : "(missing)");
    lua_pop(L, 1);
    return 0;
  }
  lua_getfield(L, el, "ns");
  const char *ns = lua_tostring(L, -1);
  sb_char(w, '<');
  sb_add(w, name, nlen);
  if (ns && (parent_ns ? strcmp(ns, parent_ns) != 0 : ns[0] != '\0')) {
    sb_str(w, " xmlns=\"");
    if (!add_escaped(w, ns, strlen(ns), "a namespace")) return 0;
    sb_char(w, '"');
  }
  if (!ns) ns = parent_ns;
  /* Attributes, sorted so the output is stable. */
  if (lua_getfield(L, el, "attrs") == LUA_TTABLE) {
    int attrs = lua_gettop(L);
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, attrs)) {
      lua_pop(L, 1);
      count++;
    }
    const char **keys = count ? lua_newuserdatauv(L, count * sizeof *keys, 0) : NULL;
    size_t k = 0;
    lua_pushnil(L);
    while (lua_next(L, attrs)) {
      lua_pop(L, 1);
      if (lua_type(L, -1) != LUA_TSTRING) {
        snprintf(w->error, sizeof w->error, "element %s: an attribute name is not a string", name);
        return 0;
      }
      keys[k++] = lua_tostring(L, -1);  /* anchored in attrs */
    }
    if (count) qsort(keys, count, sizeof *keys, cmp_str);
    int prefixes = 0;
    for (size_t i = 0; i < count; i++) {
      const char *key = keys[i];
      lua_getfield(L, attrs, key);
      size_t vlen;
      const char *val = lua_tolstring(L, -1, &vlen);
      if (!val) {
        snprintf(w->error, sizeof w->error, "element %s: attribute %s is not a string", name, key);
        return 0;
      }
      /* The URI may hold '}', a local name cannot: the last one closes it. */
      const char *close = key[0] == '{' ? strrchr(key, '}') : NULL;
      sb_char(w, ' ');
      if (close) {  /* {uri}local: declare a prefix for it */
        if (!valid_name(close + 1, strlen(close + 1))) goto bad_key;
        char prefix[24];
        snprintf(prefix, sizeof prefix, "ns%d", prefixes++);
        sb_str(w, "xmlns:");
        sb_str(w, prefix);
        sb_str(w, "=\"");
        if (!add_escaped(w, key + 1, (size_t)(close - key - 1), "a namespace")) return 0;
        sb_str(w, "\" ");
        sb_str(w, prefix);
        sb_char(w, ':');
        sb_str(w, close + 1);
      } else {
        if (!valid_name(key, strlen(key))) goto bad_key;
        sb_str(w, key);
      }
      sb_str(w, "=\"");
      char what[96];
      snprintf(what, sizeof what, "element %.30s, attribute %.30s", name, key);
      w->in_attr = 1;
      if (!add_escaped(w, val, vlen, what)) return 0;
      w->in_attr = 0;
      sb_char(w, '"');
      lua_pop(L, 1);
      continue;
    bad_key:
      snprintf(w->error, sizeof w->error, "element %s: %s is not a valid attribute name", name, key);
      return 0;
    }
  }
  lua_settop(L, el + 2);  /* name, ns */
  lua_getfield(L, el, "text");
  size_t tlen = 0;
  const char *text = lua_tolstring(L, -1, &tlen);
  lua_Integer n = (lua_Integer)lua_rawlen(L, el);
  if (tlen == 0 && n == 0) {
    sb_str(w, "/>");
    lua_settop(L, el);
    return 1;
  }
  sb_char(w, '>');
  char what[96];
  snprintf(what, sizeof what, "the text of element %.40s", name);
  if (text && !add_escaped(w, text, tlen, what)) return 0;
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, el, i);
    if (!write_element(w, ns, depth + 1)) return 0;
    lua_pop(L, 1);
  }
  sb_str(w, "</");
  sb_add(w, name, nlen);
  sb_char(w, '>');
  lua_settop(L, el);
  return 1;
}

static int l_serialize(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  writer w = {L, sb_new(L), "", 0};
  lua_pushvalue(L, 1);
  if (!write_element(&w, NULL, 1)) {
    lua_settop(L, 1);
    return sg__lua_fail(L, SG_EINVAL, w.error);
  }
  lua_pushlstring(L, w.b->data ? w.b->data : "", w.b->len);
  return 1;
}

static int l_escape(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  writer w = {L, sb_new(L), "", 1};  /* fit for attribute values too */
  if (!add_escaped(&w, s, len, "text")) return sg__lua_fail(L, SG_EINVAL, w.error);
  lua_pushlstring(L, w.b->data ? w.b->data : "", w.b->len);
  return 1;
}

int luaopen_segue_xml(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"feed", l_feed}, {"finish", l_finish}, {"depth", l_depth}, {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", l_gc}, {NULL, NULL}};
  static const luaL_Reg fns[] = {
      {"parser", l_parser}, {"serialize", l_serialize}, {"escape", l_escape}, {NULL, NULL}};
  static const luaL_Reg buf_meta[] = {{"__gc", sb_gc}, {NULL, NULL}};
  sg__lua_class(L, PARSER_MT, methods, meta);
  sg__lua_class(L, STRBUF_MT, NULL, buf_meta);
  luaL_newlib(L, fns);
  return 1;
}
