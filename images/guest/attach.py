# attach.py: the guest side of `vibebox attach`'s fast path. A long-running
# daemon that hands a tmux client of the tasks' tmux server (tasks.sh's socket
# and config) to each connection, so an attach starts no process in the guest:
# no sshd session, no pty from sshd, no login shell (the host connects with
# `ssh -W 127.0.0.1:PORT` through its control master: stdio forwarding).
#
# Not installed in the image: the host sends it with `vibebox launch` and with
# the fallback attach, and tasks.sh starts it (detached, once: a lock in the
# tasks directory). Run as: python3 attach.py DIR SOCKET CONF VERSION PORT TERM
#
# The tmux client's own start (ten shared libraries, 100-250 ms under TCG) is
# kept off an attach's critical path by ONE SPARE client: already running on a
# pty, attached to the hidden session `_spare` (a name no task can have; tasks.sh
# leaves `_` sessions out of everything). An attach sizes that pty and moves the
# client to the task with `switch-client` through a tmux control-mode client
# this daemon keeps (`tmux -C`), then starts the next spare.
#
# Protocol (session::attach on the host has the same in a doc comment):
#   host -> guest, one line:
#     VBXATTACH1 VERSION NAME COLS ROWS TERM KEY\n
#   guest -> host, one line: OK | ERR notask | ERR version | ERR bad
#   then frames both ways: TYPE (1 byte) LENGTH (4 bytes, big-endian) PAYLOAD,
#   LENGTH <= 65536:
#     host -> guest: d = input bytes; w = window size (COLS, ROWS: 2+2 bytes BE)
#     guest -> host: d = output bytes; x = the end, "detached" or "ended N"
#   The connection's end without an x frame: the link or this daemon died.
#
# Only connections from our own uid are served (the owner of the connecting
# socket, from /proc/net/tcp): another user in the guest cannot attach.
import errno
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

D, SOCK, CONF, VERSION, PORT, TERM0 = sys.argv[1:7]
PORT = int(PORT)
T = ["tmux", "-S", SOCK, "-f", CONF]
MAGIC = "VBXATTACH1"
MAX_FRAME = 65536
MAX_BUF = 1 << 20
SPARE = "_spare"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")
TERMNAME = re.compile(r"[A-Za-z0-9._+-]{1,64}\Z")
KEY = re.compile(r"[A-Za-z0-9\\\]\^\[_-]{1,16}\Z")
# The questions a tmux client asks its terminal when it starts (device
# attributes, version, colours, modes, cursor position, capabilities). The
# spare asked them long before a terminal was there: passed on, their answers
# would come too late for tmux and reach the task as typed text. Taken out of
# what the spare wrote, they stay unanswered, as on a terminal that does not
# answer (tmux then goes by TERM's terminfo).
QUERIES = re.compile(
    rb"\x1b\[(?:[>=]?[0-9;]*c|>[0-9;]*q|\??[0-9;]*n|\??[0-9;]*\$p)"
    rb"|\x1b\][0-9]+(?:;[0-9]+)*;\?(?:\x07|\x1b\\)"
    rb"|\x1bP\+q[^\x1b]*\x1b\\")


def frame(kind, payload):
    return kind + struct.pack(">I", len(payload)) + payload


def winsize(fd, cols, rows):
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    except OSError:
        pass


class Client:
    """A tmux client on a pty of ours."""

    def __init__(self, term, target, cols=80, rows=24):
        self.term = term
        m, s = os.openpty()
        winsize(m, cols, rows)
        self.tty = os.ttyname(s)
        env = dict(os.environ, TERM=term)
        env.pop("TMUX", None)

        def ctty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            self.proc = subprocess.Popen(
                T + ["attach-session", "-t", "=" + target],
                stdin=s, stdout=s, stderr=s, env=env,
                start_new_session=True, preexec_fn=ctty)
        finally:
            os.close(s)
        os.set_blocking(m, False)
        self.master = m
        # Output before the attach: the terminal's setup, kept for the host.
        self.early = b""
        self.ready = False

    def close(self):
        if self.master is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGHUP)
            except OSError:
                pass
            os.close(self.master)
            self.master = None
        reap.append(self.proc)


class Control:
    """A tmux control-mode client: commands without a process each. Replies are
    counted, so one given up on (a very slow guest) never answers a later one."""

    def __init__(self):
        self.proc = subprocess.Popen(
            T + ["-C", "attach-session", "-t", "=" + SPARE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.out = self.proc.stdout.fileno()
        self.buf = b""
        self.sent = 0
        self.got = 0
        self.want = 0
        self.cur = None
        self.results = []

    def read(self, wait):
        """Takes in what is there (waiting up to `wait` s); False at EOF."""
        if not select.select([self.out], [], [], wait)[0]:
            return True
        data = os.read(self.out, 65536)
        if not data:
            return False
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.decode("utf-8", "replace")
            if self.cur is None:
                if line.startswith("%begin ") and line.endswith(" 1"):
                    self.cur = []
            elif (line.startswith("%end ") or line.startswith("%error ")) and line.endswith(" 1"):
                if self.got >= self.want:
                    self.results.append((line.startswith("%end "), self.cur))
                self.got += 1
                self.cur = None
            else:
                self.cur.append(line)
        return True

    def run(self, *cmds):
        """Runs commands; for each, (ok, output lines)."""
        self.want, self.results = self.sent, []
        self.sent += len(cmds)
        self.proc.stdin.write("".join(c + "\n" for c in cmds).encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 20
        while self.got < self.sent:
            left = deadline - time.monotonic()
            if left <= 0 or not self.read(left):
                raise OSError("tmux control client ended or hung")
        return self.results

    def drain(self):
        if not self.read(0):
            raise OSError("tmux control client ended")


def uid_of_peer(peer):
    """The uid owning the connecting socket (its local end is our peer)."""
    want = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(peer[0]))[0], peer[1])
    mine = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton("127.0.0.1"))[0], PORT)
    with open("/proc/net/tcp") as f:
        for line in f:
            w = line.split()
            if len(w) > 7 and w[1] == want and w[2] == mine:
                return int(w[7])
    return None


class Conn:
    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        self.inbuf = b""
        self.outbuf = b""
        self.topty = b""
        self.client = None
        self.name = None
        self.closing = False
        self.deadline = time.monotonic() + 30

    def send(self, data):
        self.outbuf += data
        try:
            n = self.sock.send(self.outbuf)
            self.outbuf = self.outbuf[n:]
        except OSError:
            pass


reap = []
conns = []
spare = None
ctl = None
key = None
retiring = False
spare_due = None
asked = []


def status_of(name):
    """`ended N` when the task's command ended, else `detached`."""
    # The status tasks.sh's wrapper wrote, else tmux's (which may come a moment
    # after the pane shows dead, or, with tmux 3.3, not at all).
    for _ in range(10):
        try:
            with open(os.path.join(D, "logs", name, "status")) as f:
                return b"ended %d" % int(f.read().strip())
        except (OSError, ValueError):
            pass
        try:
            [(ok, out)] = ctl.run("display-message -p -t '=%s:' '#{pane_dead} #{pane_dead_status} #{pane_dead_signal}'" % name)
        except (OSError, ValueError):
            return b"detached"
        if not ok or not out or not out[0].startswith("1"):
            return b"detached"
        w = out[0].split()
        try:
            code = 128 + int(w[2]) if len(w) > 2 and w[2] != "0" else int(w[1])
            return b"ended %d" % code
        except (IndexError, ValueError):
            # Dead, its status not collected yet.
            time.sleep(0.05)
    return b"detached"


def new_spare(term):
    global spare
    if spare is not None and spare.term == term and spare.proc.poll() is None:
        return
    if spare is not None:
        spare.close()
        spare = None
    try:
        spare = Client(term, SPARE)
    except OSError:
        spare = None


def spare_output(wait):
    """Keeps what the spare client wrote; it is ready once tmux drew on it."""
    global spare
    if not select.select([spare.master], [], [], wait)[0]:
        return
    try:
        data = os.read(spare.master, 65536)
    except OSError:
        data = b""
    if data and len(spare.early) < MAX_BUF:
        spare.early += data
        spare.ready = True
    else:
        spare.close()
        spare = None


def handshake(c, line):
    """Gives the connection its client, or says why not."""
    global key, spare
    w = line.split(" ")
    if len(w) != 7 or w[0] != MAGIC:
        return b"ERR bad"
    if w[1] != VERSION:
        retire()
        return b"ERR version"
    name, cols, rows, term, k = w[2:]
    if not (NAME.match(name) and TERMNAME.match(term) and KEY.match(k)
            and cols.isdigit() and rows.isdigit()):
        return b"ERR bad"
    cols, rows = max(1, min(int(cols), 1000)), max(1, min(int(rows), 1000))
    cmds = []
    if k != key:
        cmds += ["unbind-key -a -T root", "bind-key -n '%s' detach-client" % k]
    if spare is not None and spare.term == term and spare.proc.poll() is None and not spare.ready:
        # Still starting (attaches in quick succession): its start is most of
        # what a fresh client would cost, so it is waited for, briefly.
        spare_output(0.5)
    if spare is not None and spare.ready and spare.term == term and spare.proc.poll() is None:
        cl, spare = spare, None
        winsize(cl.master, cols, rows)
        cmds.append("switch-client -c %s -t '=%s'" % (cl.tty, name))
        res = ctl.run(*cmds)
        key = k
        if not res[-1][0]:
            spare = cl
            return b"ERR notask"
        c.send(b"OK\n" + frame(b"d", QUERIES.sub(b"", cl.early)))
        cl.early = b""
    else:
        cmds.append("has-session -t '=%s'" % name)
        res = ctl.run(*cmds)
        key = k
        if not res[-1][0]:
            return b"ERR notask"
        cl = Client(term, name, cols, rows)
        c.send(b"OK\n")
    c.client, c.name = cl, name
    # The next spare starts once this attach's screen is drawn: under TCG a
    # tmux client's start would compete with the redraw for the CPU.
    global spare_due
    if not retiring:
        spare_due = (time.monotonic() + 0.15, term)
    return None


def retire():
    """A newer host: stop taking connections, let the new daemon in, and end
    once the attached ones end."""
    global retiring, listener, spare
    if retiring:
        return
    retiring = True
    if listener is not None:
        listener.close()
        listener = None
    os.close(lockfd)
    if spare is not None:
        spare.close()
        spare = None


def end_client(c):
    """The tmux client ended: the final status, then the connection's end."""
    cl = c.client
    c.client = None
    cl.close()
    try:
        cl.proc.wait(2)
    except subprocess.TimeoutExpired:
        pass
    c.send(frame(b"x", status_of(c.name)))
    c.closing = True


def drop(c):
    if c.client is not None:
        c.client.close()
        c.client = None
    try:
        c.sock.close()
    except OSError:
        pass
    conns.remove(c)


def from_host(c):
    """Frames from the host, as far as they are complete."""
    while len(c.inbuf) >= 5:
        kind = c.inbuf[:1]
        n = struct.unpack(">I", c.inbuf[1:5])[0]
        if n > MAX_FRAME:
            return False
        if len(c.inbuf) < 5 + n:
            break
        data, c.inbuf = c.inbuf[5:5 + n], c.inbuf[5 + n:]
        if kind == b"d":
            c.topty += data
        elif kind == b"w" and n == 4:
            cols, rows = struct.unpack(">HH", data)
            if c.client is not None and 0 < cols <= 1000 and 0 < rows <= 1000:
                winsize(c.client.master, cols, rows)
        else:
            return False
    return True


def main():
    global lockfd, listener, ctl, spare, spare_due
    os.makedirs(D, 0o700, exist_ok=True)
    lockfd = os.open(os.path.join(D, "attach.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    pidfile = os.path.join(D, "attach.pid")
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # Running: the same version stays; an older one retires for us.
        try:
            with open(pidfile) as f:
                pid, version = f.read().split()
            if version == VERSION:
                return
            os.kill(int(pid), signal.SIGUSR1)
        except (OSError, ValueError):
            return
        signal.alarm(10)
        fcntl.flock(lockfd, fcntl.LOCK_EX)
        signal.alarm(0)
    with open(pidfile + ".new", "w") as f:
        f.write("%d %s\n" % (os.getpid(), VERSION))
    os.replace(pidfile + ".new", pidfile)
    # The clients this starts need none of what tasks.sh was given.
    for k in [k for k in os.environ if k.startswith("VIBEBOX_ATTACH_")]:
        del os.environ[k]
    # A newer daemon asks us to retire: done between two turns of the loop.
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if subprocess.call(T + ["has-session", "-t", "=" + SPARE], stderr=subprocess.DEVNULL) != 0:
        subprocess.call(T + ["new-session", "-d", "-s", SPARE, "-x", "80", "-y", "24",
                             "exec sleep infinity"], stderr=subprocess.DEVNULL)
    ctl = Control()
    ctl.run("display-message -p ready")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(16)
    listener.setblocking(False)
    new_spare(TERM0 if TERMNAME.match(TERM0) else "xterm-256color")
    while listener is not None or conns:
        if asked:
            del asked[:]
            retire()
        rd, wr = [ctl.out], []
        if listener is not None:
            rd.append(listener)
        if spare is not None and spare.master is not None:
            rd.append(spare.master)
        for c in conns:
            if not c.closing and len(c.topty) < MAX_BUF:
                rd.append(c.sock)
            if c.outbuf:
                wr.append(c.sock)
            if c.client is not None:
                if len(c.outbuf) < MAX_BUF:
                    rd.append(c.client.master)
                if c.topty:
                    wr.append(c.client.master)
        r, w, _ = select.select(rd, wr, [], 0.2 if spare_due else 1)
        if spare_due is not None and time.monotonic() >= spare_due[0]:
            new_spare(spare_due[1])
            spare_due = None
        for p in list(reap):
            if p.poll() is not None:
                reap.remove(p)
        if ctl.out in r:
            ctl.drain()
        if listener is not None and listener in r:
            try:
                s, peer = listener.accept()
            except OSError:
                s = None
            if s is not None:
                try:
                    mine = uid_of_peer(peer) == os.getuid()
                except OSError:
                    mine = False
                if mine:
                    conns.append(Conn(s))
                else:
                    s.close()
        if spare is not None and spare.master in r:
            spare_output(0)
        now = time.monotonic()
        for c in list(conns):
            try:
                if c.sock in r:
                    data = c.sock.recv(65536)
                    if not data:
                        drop(c)
                        continue
                    c.inbuf += data
                    if c.name is None:
                        if b"\n" in c.inbuf:
                            line, c.inbuf = c.inbuf.split(b"\n", 1)
                            err = handshake(c, line.decode("ascii", "replace"))
                            if err:
                                c.send(err + b"\n")
                                c.closing = True
                        elif len(c.inbuf) > 512:
                            c.send(b"ERR bad\n")
                            c.closing = True
                    if c.name is not None and not from_host(c):
                        drop(c)
                        continue
                if c.client is not None and c.client.master in w and c.topty:
                    try:
                        n = os.write(c.client.master, c.topty)
                        c.topty = c.topty[n:]
                    except BlockingIOError:
                        pass
                if c.client is not None and c.client.master in r:
                    try:
                        data = os.read(c.client.master, MAX_FRAME)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data:
                        c.send(frame(b"d", data))
                    elif data is not None:
                        end_client(c)
                if c.sock in w and c.outbuf:
                    n = c.sock.send(c.outbuf)
                    c.outbuf = c.outbuf[n:]
                if c.closing and not c.outbuf:
                    drop(c)
                elif c.name is None and now > c.deadline:
                    drop(c)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                drop(c)


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE,):
            raise
