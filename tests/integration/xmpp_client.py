"""A second XMPP client for the tests (slixmpp): xmpp_client.py JID PASSWORD
PORT CA_FILE ROOM NICK. Logs in over STARTTLS on 127.0.0.1:PORT verifying
the server's certificate against CA_FILE, joins ROOM as NICK, prints every
message it sees as a JSON line, and obeys JSON commands on stdin:
  {"say": text, "id": id}                   a groupchat message ("oob": url adds XEP-0066)
  {"correct": id, "say": text}              a correction (XEP-0308) of message `id`
  {"retract": stanza_id}                    a retraction (XEP-0424) in the room
  {"chat": jid, "say": text}                a 1:1 message
  {"quit": true}"""
import asyncio
import json
import logging
import sys
import threading
from xml.etree import ElementTree as ET

import slixmpp

SID = "urn:xmpp:sid:0"


def out(v):
    sys.stdout.write(json.dumps(v) + "\n")
    sys.stdout.flush()


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, room, nick):
        super().__init__(jid, password)
        self.room, self.nick = room, nick
        for p in ("xep_0030", "xep_0045", "xep_0199"):
            self.register_plugin(p)
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("disconnected", lambda e: out({"disconnected": True}))

    async def on_start(self, event):
        self.send_presence()
        await self.plugin["xep_0045"].join_muc_wait(self.room, self.nick, maxstanzas=0, timeout=20)
        out({"joined": self.room})

    def on_message(self, msg):
        x = msg.xml
        sid = next((e.get("id") for e in x.findall("{%s}stanza-id" % SID)), None)
        rep = x.find("{urn:xmpp:message-correct:0}replace")
        oob = x.find("{jabber:x:oob}x/{jabber:x:oob}url")
        ret = x.find("{urn:xmpp:message-retract:1}retract")
        body = x.find("{%s}body" % self.default_ns)
        if body is None:
            return
        out({"type": msg["type"], "from": str(msg["from"]), "body": body.text or "", "id": msg["id"],
             "stanza_id": sid, "replace": rep.get("id") if rep is not None else None,
             "retract": ret.get("id") if ret is not None else None,
             "oob": oob.text if oob is not None else None})

    def command(self, cmd):
        if cmd.get("quit"):
            self.disconnect()
            return
        if "chat" in cmd:
            m = self.make_message(mto=cmd["chat"], mbody=cmd["say"], mtype="chat")
        elif "retract" in cmd:
            m = self.make_message(mto=self.room, mbody="retracted (fallback)", mtype="groupchat")
            ET.SubElement(m.xml, "{urn:xmpp:message-retract:1}retract", {"id": cmd["retract"]})
        else:
            m = self.make_message(mto=self.room, mbody=cmd["say"], mtype="groupchat")
            if "correct" in cmd:
                ET.SubElement(m.xml, "{urn:xmpp:message-correct:0}replace", {"id": cmd["correct"]})
            if "oob" in cmd:
                x = ET.SubElement(m.xml, "{jabber:x:oob}x")
                ET.SubElement(x, "{jabber:x:oob}url").text = cmd["oob"]
        if cmd.get("id"):
            m["id"] = cmd["id"]
        m.send()
        out({"sent": m["id"]})


def main():
    jid, password, port, ca_file, room, nick = sys.argv[1:7]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    c = Client(jid, password, room, nick)
    c.ca_certs = ca_file
    loop = asyncio.get_event_loop()

    def stdin():
        for line in sys.stdin:
            line = line.strip()
            if line:
                loop.call_soon_threadsafe(c.command, json.loads(line))
        loop.call_soon_threadsafe(c.disconnect)

    threading.Thread(target=stdin, daemon=True).start()
    c.connect(("127.0.0.1", int(port)))
    loop.run_until_complete(c.disconnected)


if __name__ == "__main__":
    main()
