#!/usr/bin/env python3
"""Helpers of the fault campaign (tests/faults/*.sh).

  plan SEED CRASHES CUTS PRIMARY_SHARE
      The campaign's random choices, one line each, from SEED alone:
        crash N TARGET LOAD_S KILL_DELAY_S DOWN_S AFTER_S MARKER_SLOT
        cut N MODE UP_S DOWN_S
      TARGET is primary or secondary (round(CRASHES * PRIMARY_SHARE) primaries, shuffled);
      MODE is close (every connection dropped, new ones refused) or stall (a black hole).

  ackwrite FILE BASE SLOTS STATE ACKS [--direct] [--interval S]
      Writes 4 KiB blocks numbered from STATE's next_seq (1 without STATE; see ackverify)
      on, into a ring of SLOTS blocks at
      byte BASE of FILE, each followed by fsync; appends the number of each write to ACKS
      once fsync returned (the write is then acknowledged by a flush). One write in flight
      at a time. Stops at the first error (the daemon died) or on SIGTERM (after the write
      in flight is acknowledged or failed).

  ackverify FILE BASE SLOTS STATE ACKS...
      Reads the ring through FILE (O_DIRECT) and checks that every slot holds the newest
      acknowledged write to it (STATE: what earlier rounds acknowledged; ACKS: this round's
      ack files). The one write that may have been in flight (the last ack + 1) may be
      there or not. Updates STATE and prints a JSON object (ok, acked, checked, bad).

  record FILE KEY=VALUE...
      Appends one JSON object to FILE (JSON lines). Values that parse as JSON (numbers,
      true, false, null, objects) keep their type; VALUE @PATH takes the text of a file
      (its last 6000 characters).

  segstate POSITION_JSON RECEIVED_DIR...
      What the replica holds of a transfer at this moment: prints "PARTS STAGED", the
      number of partial segment files (*.part: a segment being received) and of complete
      segments newer than the last committed cycle (a cycle received in part).

  summarize OUT_JSON META_JSON CLASS_JSONL...
      Merges the per-iteration records of every class into one result document and
      prints a summary table. A class without an entry in CLASS_INFO describes itself
      with a record kind=class_info class=NAME injected=TEXT checked=[TEXT...].

  markdown RESULT_JSON [DOC_MD]
      The figures of a campaign's result document as Markdown: the run (seed, time, commit),
      a table of every class (how it was injected, runs, passed, each check's passes) and
      the totals. With DOC_MD, replaces what stands between the lines
      "<!-- campaign:begin -->" and "<!-- campaign:end -->" of that file instead of printing.
"""
import hashlib
import json
import mmap
import os
import random
import signal
import struct
import sys
import time

BLOCK = 4096
MAGIC = b"SRFAULTACK\0\0"  # 12 bytes
HEADER = struct.Struct("<12sQQ")  # magic, seq, slot


def block_for(seq, slot):
    head = HEADER.pack(MAGIC, seq, slot)
    fill = hashlib.sha256(b"%d" % seq).digest()
    body = (fill * (BLOCK // len(fill) + 1))[: BLOCK - len(head)]
    return head + body


# ---------------------------------------------------------------------------------------
def cmd_plan(args):
    seed, crashes, cuts = int(args[0]), int(args[1]), int(args[2])
    share = float(args[3])
    rng = random.Random(seed)
    primaries = int(round(crashes * share))
    targets = ["primary"] * primaries + ["secondary"] * (crashes - primaries)
    rng.shuffle(targets)
    for n, target in enumerate(targets, 1):
        load = rng.uniform(0.4, 2.0)        # load before the marker
        kill_delay = rng.uniform(0.0, 0.3)  # marker acknowledged -> kill -9
        down = rng.uniform(0.2, 1.5)        # secondary only: time down under load
        after = rng.uniform(0.3, 1.2)       # secondary only: load after its restart
        slot = rng.randrange(1 << 30)
        print(f"crash {n} {target} {load:.3f} {kill_delay:.3f} {down:.3f} {after:.3f} {slot}")
    for n in range(1, cuts + 1):
        mode = "close" if rng.random() < 0.7 else "stall"
        up = rng.uniform(0.3, 2.0)
        down = rng.uniform(0.2, 1.5) if mode == "close" else rng.uniform(0.5, 3.0)
        print(f"cut {n} {mode} {up:.3f} {down:.3f}")


# ---------------------------------------------------------------------------------------
def cmd_ackwrite(args):
    direct = "--direct" in args
    interval = 0.0
    if "--interval" in args:
        interval = float(args[args.index("--interval") + 1])
    pos = [a for i, a in enumerate(args)
           if not a.startswith("--") and (i == 0 or args[i - 1] != "--interval")]
    path, base, slots, acks = pos[0], int(pos[1]), int(pos[2]), pos[4]
    try:
        with open(pos[3]) as f:
            seq = json.load(f)["next_seq"]
    except FileNotFoundError:
        seq = 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants
    with open(acks, "a", buffering=1) as ack:
        while not stop:
            slot = seq % slots
            buf.seek(0)
            buf.write(block_for(seq, slot))
            try:
                if os.pwrite(fd, buf, base + slot * BLOCK) != BLOCK:
                    raise OSError("short write")
                os.fsync(fd)
            except OSError as e:
                print(f"ackwrite: write {seq} failed: {e}", file=sys.stderr)
                return 0
            ack.write(f"{seq}\n")
            seq += 1
            if interval:
                time.sleep(interval)
    return 0


def read_acks(paths):
    seqs = []
    for p in paths:
        try:
            with open(p) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        seqs.append(int(line))
        except FileNotFoundError:
            pass
    return seqs


def cmd_ackverify(args):
    path, base, slots, state_path = args[0], int(args[1]), int(args[2]), args[3]
    ack_paths = args[4:]
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {"slots": {}, "next_seq": 1}
    expect = {int(k): v for k, v in state["slots"].items()}
    # Per ack file (one writer each) the write that may have been in flight: last + 1.
    inflight = {}
    total = 0
    top = state["next_seq"] - 1
    for p in ack_paths:
        seqs = read_acks([p])
        total += len(seqs)
        for s in seqs:
            expect[s % slots] = s  # writers go up, so the later ack wins
            top = max(top, s)
        if seqs:
            nxt = seqs[-1] + 1
            inflight[nxt % slots] = nxt
            top = max(top, nxt)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, slots * BLOCK)
    n = os.preadv(fd, [buf], base)
    os.close(fd)
    bad = []
    data = bytes(buf[:n])
    for slot, want in sorted(expect.items()):
        blk = data[slot * BLOCK:(slot + 1) * BLOCK]
        if len(blk) < BLOCK:
            bad.append({"slot": slot, "want": want, "found": "short read"})
            continue
        magic, seq, sl = HEADER.unpack_from(blk)
        ok_blocks = {want: block_for(want, slot)}
        if slot in inflight:
            ok_blocks[inflight[slot]] = block_for(inflight[slot], slot)
        if blk in ok_blocks.values():
            if seq != want:
                expect[slot] = seq  # the write in flight made it
            continue
        found = f"seq {seq}" if magic == MAGIC else "not a block of this writer"
        if magic == MAGIC and seq in ok_blocks:
            found += " (damaged)"
        bad.append({"slot": slot, "want": want, "found": found})
    # Slots the write in flight touched that held nothing acknowledged before.
    for slot, seq in inflight.items():
        if slot not in expect:
            blk = data[slot * BLOCK:(slot + 1) * BLOCK]
            if blk == block_for(seq, slot):
                expect[slot] = seq
    state = {"slots": {str(k): v for k, v in expect.items()}, "next_seq": top + 2}
    with open(state_path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(state_path + ".tmp", state_path)
    print(json.dumps({"ok": not bad, "acked": total, "checked": len(expect), "bad": bad[:10],
                      "bad_count": len(bad), "next_seq": state["next_seq"]}))
    return 0 if not bad else 1


# ---------------------------------------------------------------------------------------
def typed(v):
    if v.startswith("@"):
        try:
            with open(v[1:], errors="replace") as f:
                return f.read()[-6000:]
        except OSError as e:
            return f"({e})"
    try:
        return json.loads(v)
    except ValueError:
        return v


def cmd_record(args):
    obj = {}
    for kv in args[1:]:
        k, _, v = kv.partition("=")
        obj[k] = typed(v)
    with open(args[0], "a") as f:
        f.write(json.dumps(obj) + "\n")
    return 0


def cmd_segstate(args):
    pos_path, dirs = args[0], args[1:]
    try:
        with open(pos_path) as f:
            pos = json.load(f)
        last = [d.get("last_segment", 0) for d in pos.get("disks", [])]
    except (OSError, ValueError):
        last = []
    parts = staged = 0
    for i, d in enumerate(dirs):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        floor = last[i] if i < len(last) else 0
        for name in names:
            if name.endswith(".seg.part"):
                parts += 1
            elif name.endswith(".seg"):
                try:
                    if int(name[:-4]) > floor:
                        staged += 1
                except ValueError:
                    pass
    print(parts, staged)
    return 0


# ---------------------------------------------------------------------------------------
CLASS_INFO = {
    "crash_primary": {
        "injected": "kill -9 of the primary siterepd (east) at a random moment under write "
                    "load (fio O_DIRECT+fsync on d0, buffered on d1, and a writer of numbered "
                    "4 KiB blocks acknowledged by fsync on each disk), 0-0.3 s after a 64 KiB "
                    "marker per disk was acknowledged by fsync; stale FUSE mount removed; "
                    "restarted with --archive-logs",
        "checked": ["acked: every marker and every numbered block acknowledged by fsync reads "
                    "back through the restarted primary's disks (O_DIRECT)",
                    "prefix: after the load stops and the replica catches up, siterep-check "
                    "PRE ARCHIVE REPLICA (both disks) passes, at the replica's applied cycle",
                    "sha256: primary images equal the replica images"],
    },
    "crash_secondary": {
        "injected": "kill -9 of the replica siterepd (west) at a random moment under the same "
                    "load, down 0.2-1.5 s while the load goes on, restarted, load for "
                    "0.3-1.2 s more",
        "checked": ["acked: as for the primary (the primary was not killed)",
                    "prefix: siterep-check after the catch-up",
                    "sha256: primary images equal the replica images"],
    },
    "link_cut": {
        "injected": "the link east->west cut through tests/tcp_proxy.py under the same load: "
                    "close (every connection dropped, new ones refused; 70%) for 0.2-1.5 s or "
                    "stall (black hole; 30%) for 0.5-3 s, then healed (pass); the next cut "
                    "comes 0.3-2 s after the link has recovered",
        "checked": ["recovered: after each heal the shipper is connected and the replica's "
                    "acknowledged cycle moves past the one at the cut (within 60 s)",
                    "at each checkpoint (every FAULTS_CUT_CHECK_EVERY cuts and after the last): "
                    "acked + prefix (siterep-check) + sha256 as above"],
    },
}


def cmd_summarize(args):
    out_path, meta_path, jsonls = args[0], args[1], args[2:]
    with open(meta_path) as f:
        meta = json.load(f)
    records = []
    for p in jsonls:
        try:
            with open(p) as f:
                for line in f:
                    if line.strip():
                        records.append(json.loads(line))
        except FileNotFoundError:
            pass
    classes = {}
    notes = [r for r in records if r.get("kind") == "note"]
    for r in records:
        if r.get("kind") != "iteration":
            continue
        c = classes.setdefault(r["class"], {"iterations": 0, "passed": 0, "failed": 0,
                                            "seconds": 0.0, "failures": [], "checks": {}})
        c["iterations"] += 1
        c["seconds"] += float(r.get("seconds", 0))
        if r.get("result") == "pass":
            c["passed"] += 1
        else:
            c["failed"] += 1
            c["failures"].append(r)
        for k, v in (r.get("checks") or {}).items():
            s = c["checks"].setdefault(k, {"run": 0, "passed": 0, "failed": 0})
            if v in ("pass", "fail"):
                s["run"] += 1
                s["passed" if v == "pass" else "failed"] += 1
        for k in ("mid_segment", "mid_cycle", "recovery_torn_tail", "recovery_holes",
                  "recovery_redone"):
            if r.get(k) is True:
                c[k] = c.get(k, 0) + 1
    checkpoints = {}
    for r in records:
        if r.get("kind") != "checkpoint":
            continue
        c = checkpoints.setdefault(r["class"], {"run": 0, "passed": 0, "failed": 0,
                                                "failures": []})
        c["run"] += 1
        if r.get("result") == "pass":
            c["passed"] += 1
        else:
            c["failed"] += 1
            c["failures"].append(r)
    # A class script may describe itself (kind=class_info: injected, checked).
    info = dict(CLASS_INFO)
    for r in records:
        if r.get("kind") == "class_info":
            info[r["class"]] = {k: r[k] for k in ("injected", "checked") if k in r}
    for name, c in classes.items():
        c.update(info.get(name, {}))
        c["seconds"] = round(c["seconds"], 1)
        c["mean_seconds"] = round(c["seconds"] / max(1, c["iterations"]), 2)
        if name in checkpoints:
            c["checkpoints"] = checkpoints[name]
    ends = {r["script"]: r for r in records if r.get("kind") == "script_end"}
    doc = dict(meta)
    doc["classes"] = classes
    doc["scripts"] = ends
    doc["notes"] = notes
    total_failed = sum(c["failed"] for c in classes.values()) + \
        sum(c["failed"] for c in checkpoints.values())
    aborted = [s for s, r in ends.items() if r.get("exit_code") != 0]
    doc["passed"] = total_failed == 0 and not aborted and bool(classes)
    crash = [classes[k] for k in ("crash_primary", "crash_secondary") if k in classes]
    doc["totals"] = {
        "crash_points": {"run": sum(c["iterations"] for c in crash),
                         "passed": sum(c["passed"] for c in crash),
                         "failed": sum(c["failed"] for c in crash)},
        "link_cuts": {k: classes.get("link_cut", {}).get(k2, 0)
                      for k, k2 in (("run", "iterations"), ("passed", "passed"),
                                    ("failed", "failed"))},
        "link_checkpoints": {k: checkpoints.get("link_cut", {}).get(k, 0)
                             for k in ("run", "passed", "failed")},
        "iterations": {"run": sum(c["iterations"] for c in classes.values()),
                       "passed": sum(c["passed"] for c in classes.values()),
                       "failed": sum(c["failed"] for c in classes.values())},
        "checkpoints": {k: sum(c[k] for c in checkpoints.values())
                        for k in ("run", "passed", "failed")},
        "scripts_aborted": aborted,
    }
    doc["iterations"] = [r for r in records if r.get("kind") in ("iteration", "checkpoint")]
    with open(out_path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(out_path + ".tmp", out_path)

    print()
    print(f"fault campaign, seed {meta.get('seed')}: {meta.get('started')} .. {meta.get('ended')}"
          f" ({meta.get('seconds')} s)")
    w = max([16] + [len(n) for n in classes])
    hdr = f"{'class':<{w}} {'runs':>5} {'pass':>5} {'fail':>5} {'mean s':>7}  notes"
    print(hdr)
    print("-" * len(hdr))
    known = ("crash_primary", "crash_secondary", "link_cut")
    for name in list(known) + sorted(n for n in classes if n not in known):
        if name not in classes:
            continue
        c = classes[name]
        note = []
        if name == "crash_primary":
            note.append(f"at restart: torn tail {c.get('recovery_torn_tail', 0)}, "
                        f"holes {c.get('recovery_holes', 0)}, "
                        f"records redone {c.get('recovery_redone', 0)}")
        if name == "link_cut":
            note.append(f"mid-segment {c.get('mid_segment', 0)}, mid-cycle {c.get('mid_cycle', 0)}")
        if "checkpoints" in c:
            k = c["checkpoints"]
            note.append(f"checkpoints {k['passed']}/{k['run']} passed")
        checks = ", ".join(f"{k} {v['passed']}/{v['run']}" for k, v in c["checks"].items())
        if checks:
            note.append(checks)
        print(f"{name:<{w}} {c['iterations']:>5} {c['passed']:>5} {c['failed']:>5} "
              f"{c['mean_seconds']:>7}  {'; '.join(note)}")
    t = doc["totals"]
    print(f"all classes: {t['iterations']['passed']}/{t['iterations']['run']} iterations passed, "
          f"{t['checkpoints']['passed']}/{t['checkpoints']['run']} checkpoints passed")
    for s, r in ends.items():
        if r.get("exit_code") != 0:
            print(f"script {s} ended with exit code {r.get('exit_code')}: {r.get('detail', '')[-300:]}")
    for name, c in classes.items():
        for fl in c["failures"][:20]:
            print(f"FAILED {name} #{fl.get('n')}: {fl.get('summary', '')}")
    for name, c in checkpoints.items():
        for fl in c["failures"][:20]:
            print(f"FAILED checkpoint {name} after cut {fl.get('n')}: {fl.get('summary', '')}")
    print(f"result: {'PASS' if doc['passed'] else 'FAIL'}; written to {out_path}")
    return 0 if doc["passed"] else 1


def cmd_markdown(args):
    with open(args[0]) as f:
        doc = json.load(f)
    git = doc.get("git_at_start") or doc.get("git") or {}
    out = []
    dirty = git.get("modified_tracked_files")
    out.append(f"Run: `{os.path.relpath(args[0])}`, seed {doc['seed']} "
               f"(`FAULTS_SEED={doc['seed']}` replays the choices), {doc['started']} .. "
               f"{doc['ended']}, {doc['seconds']} s on {doc['host']['cpus']} CPUs, commit "
               f"{str(git.get('commit', 'unknown'))[:7]}"
               + (f" with {dirty} modified files" if dirty else "") + ". Result: "
               + ("every check passed." if doc["passed"] else "**FAILED** (see below)."))
    out.append("")
    out.append("| class | injected | runs | passed | checks passed / run | mean s |")
    out.append("|---|---|---|---|---|---|")
    order = ["crash_primary", "crash_secondary", "link_cut", "netns_cut", "failpoint_crash",
             "corrupt_primary_segment", "corrupt_received_segment", "corrupt_frame",
             "corrupt_replica_image", "enospc_primary_log", "enospc_secondary_state",
             "slow_secondary", "stalled_secondary"]
    names = sorted(doc["classes"], key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in names:
        c = doc["classes"][name]
        checks = ", ".join(f"{k} {v['passed']}/{v['run']}" for k, v in c["checks"].items()
                           if v["run"])
        if "checkpoints" in c:
            k = c["checkpoints"]
            checks += f"; checkpoints {k['passed']}/{k['run']}"
        injected = " ".join(str(c.get("injected", "")).split()).replace("|", "/")
        out.append(f"| {name} | {injected} | {c['iterations']} | {c['passed']} | {checks} | "
                   f"{c['mean_seconds']} |")
    t = doc["totals"]
    out.append("")
    out.append(f"In all: {t['iterations']['passed']} of {t['iterations']['run']} iterations "
               f"and {t['checkpoints']['passed']} of {t['checkpoints']['run']} checkpoints passed.")
    def one_line(text):  # a failure's summary may carry a traceback: its first line
        line = str(text).splitlines()[0] if str(text) else ""
        return line if len(line) <= 400 else line[:400] + " ..."
    for name in names:
        for fl in doc["classes"][name]["failures"]:
            out.append(f"- FAILED {name} #{fl.get('n')}: {one_line(fl.get('summary', ''))}")
    for r in doc.get("notes", []):
        out.append(f"- note ({r.get('class', '')}): {r.get('text', '')}")
    text = "\n".join(out) + "\n"
    if len(args) < 2:
        sys.stdout.write(text)
        return 0
    begin, end = "<!-- campaign:begin -->\n", "<!-- campaign:end -->"
    with open(args[1]) as f:
        md = f.read()
    a, b = md.find(begin), md.find(end)
    if a < 0 or b < a:
        print(f"{args[1]}: no {begin.strip()} ... {end} lines", file=sys.stderr)
        return 1
    with open(args[1] + ".tmp", "w") as f:
        f.write(md[: a + len(begin)] + text + md[b:])
    os.replace(args[1] + ".tmp", args[1])
    return 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"plan": cmd_plan, "ackwrite": cmd_ackwrite, "ackverify": cmd_ackverify,
          "record": cmd_record, "segstate": cmd_segstate,
          "summarize": cmd_summarize, "markdown": cmd_markdown}[cmd]
    sys.exit(fn(args))


if __name__ == "__main__":
    main()
