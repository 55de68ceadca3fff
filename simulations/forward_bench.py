#!/usr/bin/env python3
"""Forwarding benchmark on loopback: a warren forward beside a direct TCP connection and a plain
socat TCP forward, all to the same service, in one run. Reports each figure and its ratio to socat.

Usage: simulations/forward_bench.py [--mib 512] [--rounds N] [--baseline OLD_WARREN_BIN]
       (builds warren in release; needs socat; runs dumbpipe beside them when it is installed,
       `cargo install dumbpipe`)
With dumbpipe, the whole run moves into a fresh network namespace with only loopback (needs
root): dumbpipe (iroh) would otherwise contact its public relay and discovery servers.
Peak RSS sums both ends of a forwarder.
With --relay, warren is also measured through a volunteer relay: the serving node sits behind
the relay with no path of its own (three namespaces), and the relay's own CPU per GiB is reported
beside the two ends' (the relay runs with its byte and bandwidth limits lifted).
CPU-seconds per GiB counts both ends of a forwarder (warren's two nodes; socat's process and
its per-connection children) over the bulk upload and download, the steadiest figure here.
Nothing here asserts: machines are shared and noisy, so read the ratios, not the absolutes.
"""
import argparse, json, os, resource, shlex, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "warren")
CHUNK = 256 * 1024
# How long the connections held open may take to echo, all of them together.
HELD_ECHO_WITHIN = 30


def serve(listener):
    """One service for every test: first byte E = echo, S = sink, D<8-byte n> = send n bytes."""
    def handle(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        try:
            mode = conn.recv(1)
            if mode == b"E":
                while True:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    conn.sendall(memoryview(buf)[:n])
            elif mode == b"S":
                total = 0
                while True:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    total += n
                conn.sendall(total.to_bytes(8, "big"))
            elif mode == b"D":
                n = int.from_bytes(recv_exact(conn, 8), "big")
                block = bytes(CHUNK)
                while n > 0:
                    k = min(n, CHUNK)
                    conn.sendall(block[:k])
                    n -= k
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def recv_exact(conn, n):
    out = b""
    while len(out) < n:
        part = conn.recv(n - len(out))
        if not part:
            raise OSError("closed early")
        out += part
    return out


def connect(port):
    """`port` on loopback, or a (host, port) pair."""
    s = socket.create_connection(port if isinstance(port, tuple) else ("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def upload(port, nbytes):
    s = connect(port)
    s.sendall(b"S")
    block = bytes(CHUNK)
    t = time.perf_counter()
    left = nbytes
    while left > 0:
        k = min(left, CHUNK)
        s.sendall(block[:k])
        left -= k
    s.shutdown(socket.SHUT_WR)
    got = int.from_bytes(recv_exact(s, 8), "big")
    dt = time.perf_counter() - t
    s.close()
    assert got == nbytes, (got, nbytes)
    return nbytes / dt / 2**20


def download(port, nbytes):
    s = connect(port)
    s.sendall(b"D" + nbytes.to_bytes(8, "big"))
    buf = bytearray(CHUNK)
    t = time.perf_counter()
    got = 0
    while True:
        n = s.recv_into(buf)
        if n == 0:
            break
        got += n
    dt = time.perf_counter() - t
    s.close()
    assert got == nbytes, (got, nbytes)
    return nbytes / dt / 2**20


def rtt(port, rounds=2000):
    s = connect(port)
    s.sendall(b"E")
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        s.sendall(b"x")
        recv_exact(s, 1)
        samples.append(time.perf_counter() - t)
    s.close()
    return pct(samples, 50), pct(samples, 99)


def setup(port, n=200):
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        s = connect(port)
        s.sendall(b"Ex")
        recv_exact(s, 1)
        samples.append(time.perf_counter() - t)
        s.close()
    return pct(samples, 50), pct(samples, 99)


def concurrent(port, n=200, size=64 * 1024):
    errors = []

    def one():
        try:
            s = connect(port)
            s.sendall(b"E")
            payload = os.urandom(size)
            threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)), daemon=True).start()
            back = b""
            while True:
                part = s.recv(CHUNK)
                if not part:
                    break
                back += part
            if back != payload:
                same = next((i for i, (a, b) in enumerate(zip(back, payload)) if a != b), min(len(back), size))
                errors.append(f"{len(back)} of {size} bytes back, the first {same} intact")
            s.close()
        except OSError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, f"{port}: {len(errors)} of {n} connections failed: {errors[:3]}"
    return time.perf_counter() - t


def held_open(port, n, pids):
    """`n` connections opened one after another and held open, each echoing 1 KiB once they all
    are: seconds to open them all, seconds for the echoes, how many echoed intact, and the
    forwarder's resident memory (both ends, MiB) while they are open, before and after the
    echoes."""
    payload = os.urandom(1024)
    conns = []
    try:
        t = time.perf_counter()
        for _ in range(n):
            s = connect(port)
            s.sendall(b"E")
            conns.append(s)
        opened = time.perf_counter() - t
        rss_idle = rss_mib(pids)
        t = time.perf_counter()
        deadline = t + HELD_ECHO_WITHIN
        intact = 0
        for s in conns:
            s.settimeout(HELD_ECHO_WITHIN)
            try:
                s.sendall(payload)
            except OSError:
                pass
        for s in conns:
            try:
                s.settimeout(max(0.001, deadline - time.perf_counter()))
                intact += recv_exact(s, len(payload)) == payload
            except OSError:  # reset, closed early, or no echo by the deadline
                pass
        echoed = time.perf_counter() - t
        return opened, echoed, intact, rss_idle, rss_mib(pids)
    finally:
        for s in conns:
            s.close()


def rss_mib(pids):
    """The sum of the processes' and their children's resident set sizes now (VmRSS; socat's
    per-connection children count), MiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        total += rss_mib(children)
    return total


def cpu_seconds(pids):
    """User + system CPU of these processes and of their reaped children (socat forks one per
    connection), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pids):
    """The sum of the processes' peak resident set sizes (VmHWM), MiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return total / 1024


def dumbpipe_forward(service, procs, pids, netns=None):
    """dumbpipe listen-tcp in front of the service (in `netns`, when given) and connect-tcp here
    on a free port: the port."""
    listen = subprocess.Popen([*in_ns(netns), "dumbpipe", "listen-tcp", "--host", f"127.0.0.1:{service}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(listen)
    ticket = None
    deadline = time.time() + 30
    while ticket is None and time.time() < deadline:
        line = listen.stdout.readline()
        if not line:
            break
        ticket = next((w for w in line.split() if w.startswith(("endpoint", "node")) and len(w) > 40), None)
    if ticket is None:
        sys.exit("dumbpipe listen-tcp printed no ticket")
    threading.Thread(target=lambda: [None for _ in listen.stdout], daemon=True).start()
    port = free_port()
    procs.append(subprocess.Popen(["dumbpipe", "connect-tcp", "--addr", f"127.0.0.1:{port}", ticket],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    pids["dumbpipe"] = [listen.pid, procs[-1].pid]
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return port
        except OSError:
            time.sleep(0.05)
    sys.exit("dumbpipe connect-tcp did not listen")


def pct(samples, p):
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(len(samples) * p / 100))]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def warren(data_dir, *args, check=True, bin=None):
    out = subprocess.run([bin or BIN, "--data-dir", data_dir, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"warren {args}: {out.stderr}")
    return out.stdout


def in_ns(netns):
    """The command prefix that runs a program in network namespace `netns` (none: here)."""
    return ["ip", "netns", "exec", netns] if netns else []


def start_node(data_dir, *extra, bin=None, ip="127.0.0.1", netns=None, tcp_only=False, listen=None):
    """`listen=[]`: no listen address at all (a node reachable only through a relay)."""
    if listen is None:
        listen = ["--listen", f"/ip4/{ip}/tcp/0"] if tcp_only else ["--listen", f"/ip4/{ip}/udp/0/quic-v1", "--listen", f"/ip4/{ip}/tcp/0"]
        listen += ["--dht-mode", "server"]
    else:
        listen = listen or ["--no-listen"]
    p = subprocess.Popen([*in_ns(netns), bin or BIN, "--data-dir", data_dir, "up", "--no-mdns",
                          *listen, *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    for _ in range(500):
        if subprocess.run([bin or BIN, "--data-dir", data_dir, "status"], capture_output=True).returncode == 0:
            return p
        time.sleep(0.02)
    sys.exit("node did not start")


# Limits a relay operator lifts to carry bulk traffic (the defaults cap a circuit at 1 GiB and all
# circuits together at 10 MiB/s).
UNLIMITED_RELAY = """[relay_limits]
max_circuit_bytes = "unlimited"
max_circuit_duration_secs = "unlimited"
max_relayed_bytes_per_sec = "unlimited"
"""


def relayed_forward(base, procs, pids, namespaces):
    """A forward through a volunteer relay: client here, relay and server each in a namespace of
    their own, joined by veth pairs (MTU 1500); the relay does not route, so the server's only way
    in is a circuit. Returns the forward's port and the client's data dir; pids gets the two ends
    (as "warren-relay") and the relay."""
    mid, behind = f"wrnmid{os.getpid()}", f"wrnbehind{os.getpid()}"
    client_ip, relay_ip, relay_far_ip, server_ip = "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"
    for ns in (mid, behind):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        namespaces.append(ns)
    for cmd in (["ip", "link", "add", "wrnr0", "mtu", "1500", "type", "veth", "peer", "name", "wrnr1", "mtu", "1500", "netns", mid],
                ["ip", "addr", "add", f"{client_ip}/24", "dev", "wrnr0"], ["ip", "link", "set", "wrnr0", "up"],
                [*in_ns(mid), "ip", "addr", "add", f"{relay_ip}/24", "dev", "wrnr1"], [*in_ns(mid), "ip", "link", "set", "wrnr1", "up"],
                [*in_ns(mid), "ip", "link", "add", "wrnr2", "mtu", "1500", "type", "veth", "peer", "name", "wrnr3", "mtu", "1500", "netns", behind],
                [*in_ns(mid), "ip", "addr", "add", f"{relay_far_ip}/24", "dev", "wrnr2"], [*in_ns(mid), "ip", "link", "set", "wrnr2", "up"],
                [*in_ns(mid), "ip", "link", "set", "lo", "up"],
                [*in_ns(behind), "ip", "addr", "add", f"{server_ip}/24", "dev", "wrnr3"], [*in_ns(behind), "ip", "link", "set", "wrnr3", "up"],
                [*in_ns(behind), "ip", "link", "set", "lo", "up"],
                # The server reaches the relay's client-side address through the relay's other one.
                [*in_ns(behind), "ip", "route", "add", f"{relay_ip}/32", "via", relay_far_ip]):
        subprocess.run(cmd, check=True)
    service = free_port()
    procs.append(subprocess.Popen([*in_ns(behind), sys.executable, os.path.abspath(__file__), "--serve", str(service)]))
    os.makedirs(base, exist_ok=True)
    config = os.path.join(base, "relay.toml")
    with open(config, "w") as f:
        f.write(UNLIMITED_RELAY)
    relay_dir, server_dir, client_dir = (os.path.join(base, n) for n in ("relay", "server", "client"))
    # A volunteer relay that also serves the DHT (in a lab AutoNAT confirms neither by itself).
    procs.append(subprocess.Popen([*in_ns(mid), BIN, "--data-dir", relay_dir, "up", "--no-mdns", "--relay-force", "--dht-mode", "server", "--config", config,
                                   "--listen", f"/ip4/{relay_ip}/udp/0/quic-v1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"}))
    pids["relay"] = [procs[-1].pid]
    wait_for(lambda: succeeds(relay_dir, "status"), "the relay's control API")
    status = json.loads(warren(relay_dir, "status", "--json"))
    relay_addr = f"{next(a for a in status['listen_addrs'] if 'quic' in a)}/p2p/{status['peer_id']}"
    procs.append(start_node(server_dir, "--relay-via", relay_addr, "--bootstrap", relay_addr, "--auto-relays", "0",
                            netns=behind, listen=[]))
    procs.append(start_node(client_dir, "--bootstrap", relay_addr, listen=[]))
    pids["warren-relay"] = [procs[-1].pid, procs[-2].pid]
    server_id, client_id = warren(server_dir, "id").strip(), warren(client_dir, "id").strip()
    warren(server_dir, "expose", "bench", f"127.0.0.1:{service}", "--allow", client_id)
    wait_for(lambda: any(h["accepted"] for h in json.loads(warren(server_dir, "status", "--json"))["relayed_through"]),
             "the server's reservation on the relay")
    wait_for(lambda: succeeds(client_dir, "find", server_id), "the client finding the server through the relay")
    fwd = json.loads(warren(client_dir, "forward", "127.0.0.1:0", f"{server_id}/bench", "--json"))
    return int(fwd["bind"].rsplit(":", 1)[1]), client_dir


def succeeds(data_dir, *args):
    return subprocess.run([BIN, "--data-dir", data_dir, *args], capture_output=True).returncode == 0


def wait_for(condition, what, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512, help="bulk transfer size each way")
    ap.add_argument("--baseline", metavar="WARREN_BIN",
                    help="another warren binary (an older build, say) measured beside this one in the same run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every path this many times, interleaved, and report medians")
    ap.add_argument("--veth", action="store_true",
                    help="put the service and the serving end of every forwarder in a second network namespace "
                         "behind a veth pair with MTU 1500, as on a real path (needs root)")
    ap.add_argument("--tcp", action="store_true",
                    help="also measure warren over TCP alone (Noise + Yamux, the transport of UDP-blocked networks)")
    ap.add_argument("--conns", type=int, default=0, metavar="N",
                    help="also hold N connections open through every path at once (each echoes 1 KiB once all "
                         "are open): time to open them, time for the echoes, the forwarder's memory meanwhile")
    ap.add_argument("--relay", action="store_true",
                    help="also measure warren through a volunteer relay: client, relay and server in three network "
                         "namespaces (veth, MTU 1500), the server reachable only through the relay (needs root)")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", metavar="PORT", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Every held connection is a socket here and, without --veth, the service's end another.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.conns + 1024)), hard))
    if args.serve:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", args.serve))
        listener.listen(1024)
        serve(listener)
        return
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "warren-node"], cwd=ROOT, check=True)
    if (shutil.which("dumbpipe") or args.veth or args.relay) and not args.in_netns:
        # Loopback only: nothing dumbpipe tries to reach beyond this host gets out, and the veth
        # pair lives and dies with this namespace.
        inner = " ".join([sys.executable, os.path.abspath(__file__), "--in-netns", *map(shlex.quote, sys.argv[1:])])
        sys.exit(subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {inner}"]).returncode)

    procs = []
    pids = {}
    far, far_ip, near_ip = None, "127.0.0.1", "127.0.0.1"
    namespaces = []
    try:
        if args.veth:
            # The far side: its own namespace, a veth pair with MTU 1500, the service in there.
            far, far_ip, near_ip = f"wrnbench{os.getpid()}", "10.77.0.2", "10.77.0.1"
            for cmd in (["ip", "netns", "add", far],
                        ["ip", "link", "add", "wrnb0", "mtu", "1500", "type", "veth", "peer", "name", "wrnb1", "mtu", "1500", "netns", far],
                        ["ip", "addr", "add", f"{near_ip}/24", "dev", "wrnb0"], ["ip", "link", "set", "wrnb0", "up"],
                        [*in_ns(far), "ip", "addr", "add", f"{far_ip}/24", "dev", "wrnb1"],
                        [*in_ns(far), "ip", "link", "set", "wrnb1", "up"], [*in_ns(far), "ip", "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True)
            namespaces.append(far)
            service = free_port()
            procs.append(subprocess.Popen([*in_ns(far), sys.executable, os.path.abspath(__file__), "--serve", str(service)]))
        else:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            service = listener.getsockname()[1]
            threading.Thread(target=serve, args=(listener,), daemon=True).start()
        socat_port = free_port()
        procs.append(subprocess.Popen(["socat", f"TCP-LISTEN:{socat_port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                                       f"TCP:{far_ip}:{service},nodelay"]))
        pids["socat"] = [procs[-1].pid]
        tmp = tempfile.mkdtemp(prefix="warren-fwd-bench.")

        def warren_forward(name, bin, tcp_only=False):
            """Two nodes of `bin`, the service exposed on one, forwarded from the other: the port.
            `tcp_only`: the nodes listen on TCP alone (Noise + Yamux, as on a UDP-blocked network)."""
            server_dir, client_dir = os.path.join(tmp, name, "server"), os.path.join(tmp, name, "client")
            procs.append(start_node(server_dir, bin=bin, ip=far_ip, netns=far, tcp_only=tcp_only))
            pids[name] = [procs[-1].pid]
            status = json.loads(warren(server_dir, "status", "--json", bin=bin))
            server_id = status["peer_id"]
            listen = next(a for a in status["listen_addrs"] if ("tcp" if tcp_only else "quic") in a)
            procs.append(start_node(client_dir, "--bootstrap", f"{listen}/p2p/{server_id}", bin=bin, ip=near_ip, tcp_only=tcp_only))
            pids[name].append(procs[-1].pid)
            client_id = warren(client_dir, "id", bin=bin).strip()
            warren(server_dir, "expose", "bench", f"127.0.0.1:{service}", "--allow", client_id, bin=bin)
            fwd = json.loads(warren(client_dir, "forward", "127.0.0.1:0", f"{server_id}/bench", "--json", bin=bin))
            return int(fwd["bind"].rsplit(":", 1)[1])

        paths = [("direct", (far_ip, service)), ("socat", socat_port)]
        if shutil.which("dumbpipe"):
            paths.append(("dumbpipe", dumbpipe_forward(service, procs, pids, far)))
        paths.append(("warren", warren_forward("warren", BIN)))
        if args.tcp:
            paths.append(("warren-tcp", warren_forward("warren-tcp", BIN, tcp_only=True)))
        if args.baseline:
            paths.append(("baseline", warren_forward("baseline", os.path.abspath(args.baseline))))
        if args.relay:
            port, relay_client_dir = relayed_forward(os.path.join(tmp, "warren-relay"), procs, pids, namespaces)
            paths.append(("warren-relay", port))
        for port in ((far_ip, service), ("127.0.0.1", socat_port)):
            while True:
                try:
                    socket.create_connection(port).close()
                    break
                except OSError:
                    time.sleep(0.05)

        nbytes = args.mib * 2**20
        samples = {name: [] for name, _ in paths}
        for _ in range(args.rounds):
            for name, port in paths:
                print(f"measuring {name}", file=sys.stderr, flush=True)
                setup(port, 20)  # warm up: connection to the peer, threads
                r50, r99 = rtt(port)
                s50, s99 = setup(port)
                cpu0, relay0 = cpu_seconds(pids.get(name, [])), cpu_seconds(pids.get("relay", []))
                up, down = upload(port, nbytes), download(port, nbytes)
                cpu = cpu_seconds(pids.get(name, [])) - cpu0
                relay_cpu = cpu_seconds(pids.get("relay", [])) - relay0
                samples[name].append({
                    "upload_mib_s": up,
                    "download_mib_s": down,
                    "cpu_s_per_gib": cpu / (2 * nbytes / 2**30),
                    "rtt_p50_us": r50 * 1e6, "rtt_p99_us": r99 * 1e6,
                    "setup_p50_ms": s50 * 1e3, "setup_p99_ms": s99 * 1e3,
                    "concurrent_200x64k_ms": concurrent(port) * 1e3,
                    "peak_rss_mib": peak_rss_mib(pids.get(name, [])),
                })
                if name == "warren-relay":
                    # Only a forward that stayed relayed measured the relay.
                    path = json.loads(warren(relay_client_dir, "forwards", "--json"))[0]["path"]
                    if path != "relayed":
                        sys.exit(f"the relayed forward's path became {path!r}: the relay was not measured")
                    # The relay's own cost, apart from the two ends' (which the row above counts).
                    samples[name][-1]["relay_cpu_s_per_gib"] = relay_cpu / (2 * nbytes / 2**30)
                    samples[name][-1]["relay_peak_rss_mib"] = peak_rss_mib(pids["relay"])
                # Last, so that what the held connections leave behind disturbs nothing else.
                if args.conns:
                    opened, echoed, intact, rss_idle, rss_busy = held_open(port, args.conns, pids.get(name, []))
                    samples[name][-1].update({
                        f"open_{args.conns}_ms": opened * 1e3, f"echo_{args.conns}x1k_ms": echoed * 1e3,
                        f"echoed_intact_of_{args.conns}": intact,
                        f"rss_{args.conns}_open_mib": rss_idle, f"rss_{args.conns}_echoed_mib": rss_busy,
                    })
        rows = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in samples.items()}
        print(json.dumps(samples, indent=2), file=sys.stderr)
        names = [name for name, _ in paths]
        keys = list(dict.fromkeys(k for row in rows.values() for k in row))
        # Ratios of every forwarder to socat, and of warren (and the baseline) to dumbpipe.
        ratios = [(n, "socat") for n in names[2:]]
        if "warren-relay" in rows:
            ratios.append(("warren-relay", "warren"))
        if "dumbpipe" in rows:
            ratios += [(n, "dumbpipe") for n in names if n in ("warren", "warren-tcp", "baseline")]
        print(f"medians of {args.rounds} round(s)")
        print("| metric | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
        print("|---" * (len(names) + len(ratios) + 1) + "|")
        for k in keys:
            ratio = lambda a, b: f"{rows[a][k] / rows[b][k]:.2f}" if rows[a].get(k) and rows[b].get(k) else "-"
            print(f"| {k} | " + " | ".join(f"{rows[n][k]:.2f}" if k in rows[n] else "-" for n in names) + " | "
                  + " | ".join(ratio(a, b) for a, b in ratios) + " |")
    finally:
        for p in procs:
            p.kill()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
