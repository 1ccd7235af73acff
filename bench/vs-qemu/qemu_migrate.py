#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One QEMU live migration of the vs-QEMU guest on loopback, driven over QMP.

Starts a source QEMU running the boot-sector guest and a destination QEMU with
`-incoming defer`, waits until the guest has made a pass over its range (its console
shows "AB") plus --warmup seconds, sets the migration capabilities and parameters of the
chosen configuration on both sides, migrates over TCP to 127.0.0.1, polls query-migrate
every 50 ms until the migration completes, fails or reaches --timeout (then it is
cancelled and reported as "timeout"), checks that the destination runs (query-status and
a pass counter read twice through HMP `xp`, plus a growing serial log), stops both QEMUs
and prints one JSON object on stdout:

  {"system": "qemu", "variant": ..., "result": "completed" | "timeout" | "failed",
   "total_ms", "downtime_ms", "setup_ms", "bytes", "dest_running", "dest_passes": [a, b],
   "guest_dirty_MBps", "query_migrate": {...the last answer...}, "params": {...},
   "caps": {...}}

`bytes` is query-migrate's ram.transferred (all RAM bytes put on the wire, page headers
and zero-page markers included). `guest_dirty_MBps` is how fast the guest wrote pages on
the source while the migration ran (from its pass counter and EBX, read before and after). The QMP client is the smallest that works: one JSON
object per line each way, events skipped. Used by bench/vs-qemu/run.sh.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


class QMP:
    def __init__(self, path, timeout=30.0):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > end:
                    raise RuntimeError("no QMP socket at %s after %.0f s" % (path, timeout))
                time.sleep(0.05)
        self.f = self.s.makefile("rwb", buffering=0)
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write((json.dumps(req) + "\n").encode())
        msg = self._read()
        if "error" in msg:
            raise RuntimeError("%s: %s" % (name, msg["error"].get("desc", msg["error"])))
        return msg.get("return")

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def read_passes(q):
    # The guest counts its passes in the dword at guest-physical 0x600.
    out = q.hmp("xp /1wx 0x600")  # "0000000000000600: 0x000000ab"
    return int(out.split(":")[1].split()[0], 16)


def read_pages(q, rng):
    """Pages the guest has written since it started: whole passes (the counter) plus its
    position in the current pass (EBX is its pointer into [1 MiB, 1 MiB + rng))."""
    passes = read_passes(q)
    regs = q.hmp("info registers")
    ebx = int(regs.split("EBX=")[1].split()[0], 16)
    pages = passes * (rng // 4096)
    if 0x100000 <= ebx < 0x100000 + rng:
        pages += (ebx - 0x100000) // 4096
    return pages


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def wait_console(path, text, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--img", required=True)
    ap.add_argument("--memory", required=True, help="QEMU -m value, e.g. 1G")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--variant", default="default", help="label printed in the result")
    ap.add_argument("--dirty-ring", type=int, default=0,
                    help="KVM dirty ring entries on both sides (0: dirty bitmap, QEMU's default)")
    ap.add_argument("--max-bandwidth", type=int, default=-1,
                    help="bytes/s; -1 keeps QEMU's default")
    ap.add_argument("--auto-converge", action="store_true")
    ap.add_argument("--multifd", type=int, default=0, help="multifd channels (0: off)")
    ap.add_argument("--multifd-compression", default="",
                    help="multifd-compression parameter (zstd, zlib); needs --multifd")
    ap.add_argument("--postcopy", action="store_true",
                    help="postcopy-ram on both sides and migrate-start-postcopy right after "
                         "migrate: postcopy with no precopy round, as ferry's postcopy variant")
    ap.add_argument("--downtime-limit", type=int, default=-1, help="ms; -1 keeps the default")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=2)
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    accel = "kvm" + (",dirty-ring-size=%d" % args.dirty_ring if args.dirty_ring else "")
    procs = {}
    res = {"system": "qemu", "variant": args.variant, "result": "failed"}

    def start(side, extra):
        sock = os.path.join(args.workdir, side + ".qmp")
        log = os.path.join(args.workdir, side + ".serial")
        for p in (sock, log):
            if os.path.exists(p):
                os.unlink(p)
        cmd = [args.qemu, "-accel", accel, "-m", args.memory, "-smp", "1", "-nographic",
               "-nodefaults", "-no-user-config",
               "-drive", "file=%s,format=raw,if=ide,snapshot=on" % args.img,
               "-serial", "file:" + log, "-qmp", "unix:%s,server=on,wait=off" % sock] + extra
        err = open(os.path.join(args.workdir, side + ".stderr"), "wb")
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        res.setdefault("cmdline", {})[side] = " ".join(cmd)
        return sock, log

    src = dst = None
    try:
        dst_sock, dst_log = start("dst", ["-incoming", "defer"])
        src_sock, src_log = start("src", [])
        src = QMP(src_sock)
        dst = QMP(dst_sock)
        if not wait_console(src_log, "AB", 60):
            raise RuntimeError("the guest did not complete a pass in 60 s (serial log: %r)"
                               % open(src_log, "rb").read()[-200:])
        time.sleep(args.warmup)

        caps = {}
        if args.auto_converge:
            caps["auto-converge"] = True
        if args.multifd:
            caps["multifd"] = True
        if args.postcopy:
            caps["postcopy-ram"] = True
        for q in (src, dst):
            if caps:
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            if args.multifd:
                q.cmd("migrate-set-parameters", **{"multifd-channels": args.multifd})
            if args.multifd_compression:
                q.cmd("migrate-set-parameters",
                      **{"multifd-compression": args.multifd_compression})
        p = {}
        if args.max_bandwidth >= 0:
            p["max-bandwidth"] = args.max_bandwidth
            if args.postcopy:  # the postcopy phase has a cap of its own
                p["max-postcopy-bandwidth"] = args.max_bandwidth
        if args.downtime_limit >= 0:
            p["downtime-limit"] = args.downtime_limit
        if p:
            src.cmd("migrate-set-parameters", **p)
        res["caps"] = caps
        res["params"] = src.cmd("query-migrate-parameters")

        port = free_port()
        uri = "tcp:127.0.0.1:%d" % port
        dst.cmd("migrate-incoming", uri=uri)
        with open(args.img, "rb") as f:
            rng = int.from_bytes(f.read()[0x1f8:0x1fc], "little")
        pages_before = read_pages(src, rng)
        t0 = time.monotonic()
        src.cmd("migrate", uri=uri)
        if args.postcopy:
            src.cmd("migrate-start-postcopy")
        end = t0 + args.timeout
        info = {}
        while True:
            info = src.cmd("query-migrate")
            st = info.get("status")
            if st in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > end:
                src.cmd("migrate_cancel")
                for _ in range(400):
                    info2 = src.cmd("query-migrate")
                    if info2.get("status") in ("cancelled", "failed", "completed"):
                        break
                    time.sleep(0.05)
                info["status_after_cancel"] = info2.get("status")
                res["result"] = "timeout"
                break
            time.sleep(0.05)
        res["wall_ms"] = round((time.monotonic() - t0) * 1000)
        res["query_migrate"] = info
        ram = info.get("ram", {})
        res["bytes"] = ram.get("transferred")
        # Pages the guest wrote on the source while the migration ran (every write dirties
        # a page: the range is far larger than a cache): its dirty rate.
        try:
            pages = read_pages(src, rng) - pages_before
            res["guest_pages_written"] = pages
            res["guest_dirty_MBps"] = round(pages * 4096 / (res["wall_ms"] / 1000) / 1e6)
        except Exception:
            pass
        if info.get("status") == "completed":
            # QEMU 7.2 sets "completed" a moment before it stores total-time and downtime
            # (multifd makes the window wide enough to hit): read again until they are set.
            for _ in range(100):
                if info.get("total-time"):
                    break
                time.sleep(0.01)
                info = src.cmd("query-migrate")
            res["query_migrate"] = info
            res["result"] = "completed"
            res["total_ms"] = info.get("total-time")
            res["downtime_ms"] = info.get("downtime")
            res["setup_ms"] = info.get("setup-time")
            # The destination must run the guest: status, pass counter and console.
            st = None
            for _ in range(100):
                st = dst.cmd("query-status")
                if st.get("status") == "running":
                    break
                time.sleep(0.05)
            res["dest_status"] = st.get("status")
            a = read_passes(dst)
            s0 = file_size(dst_log)
            time.sleep(1.5)
            b = read_passes(dst)
            res["dest_passes"] = [a, b]
            res["dest_console_grew"] = file_size(dst_log) > s0
            res["dest_running"] = st.get("status") == "running" and b > a
        elif res["result"] != "timeout":
            res["error"] = info.get("error-desc", info.get("status"))
    except Exception as e:  # report, never hang the harness
        res["error"] = str(e)
        # A QMP error is usually a QEMU that died: say which and why.
        time.sleep(0.2)
        for side, p in procs.items():
            if p.poll() is not None:
                try:
                    with open(os.path.join(args.workdir, side + ".stderr"), "rb") as f:
                        last = f.read().decode(errors="replace").strip().splitlines()
                except OSError:
                    last = []
                res["error"] += "; %s QEMU exited with status %d%s" % (
                    side, p.returncode, ": " + last[-1] if last else "")
    finally:
        for q in (src, dst):
            if q:
                try:
                    q.cmd("quit")
                except Exception:
                    pass
                q.close()
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
