#!/usr/bin/env python3
"""Offline lint of callapi's OpenSIPS scripts (Python 3.11, standard library only).

Catches the mistakes `opensips -c` lets through and that break callapi:
create_dialog flags of the wrong OpenSIPS version, a module callapi needs not loaded, a
function or variable of a module that is not loaded, route[callapi_referred] /
route[callapi_ruri] drifting from the reference scripts or called in the wrong place, routes
called but not defined, unbalanced braces, and the 3.6 and 4.0 scripts differing in more than
the lines allowed to differ. deploy/opensips/README.md lists every check.

    python3 deploy/opensips/check.py            # the four scripts beside this file
    python3 deploy/opensips/check.py FILE...    # these (3.6 / 4.0 read from the file name;
                                                # "reference-" at its start: a reference script)

Exit status 0 when no errors, 1 otherwise; every error names the file and line.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FILES = [
    "opensips-3.6.cfg",
    "opensips-4.0.cfg",
    "reference-opensips-3.6.cfg",
    "reference-opensips-4.0.cfg",
]

# ---------------------------------------------------------------------------------------------
# What OpenSIPS 3.6 / 4.0 export (read from their sources: core_cmds.c and each module's
# cmd_export_t table; the same names in 3.6.8 and 4.0.1 for the modules below).

CORE_FUNCTIONS = set(
    """forward send setflag resetflag isflagset setbflag resetbflag isbflagset sethost
    sethostport setuser setuserpass setport seturi prefix strip strip_tail append_branch_old
    append_msg_branch remove_msg_branch move_msg_branch swap_msg_branches pv_printf revert_uri
    setdsturi resetdsturi isdsturiset force_rport add_local_rport force_tcp_alias
    set_advertised_address set_advertised_port force_send_socket serialize_branches
    next_branches use_blacklist unuse_blacklist check_blacklist_rule add_blacklist_rule
    del_blacklist_rule cache_store cache_remove cache_fetch cache_counter_fetch cache_add
    cache_sub cache_raw_query raise_event subscribe_event construct_uri get_timestamp
    script_trace is_myself sr_check_status avp_print set_via_handling xlog xdbg""".split()
)
CORE_FUNCTIONS_40_ONLY = {"tcp_close_conn", "socket_belongs_to_bond"}

MODULE_FUNCTIONS = {
    "tm": """t_add_cancel_reason t_add_hdrs t_anycast_replicate t_cancel_branch t_check_status
        t_check_trans t_flush_flags t_get_branch_idx_by_attr t_inject_branches t_local_replied
        t_new_request t_newtran t_on_branch t_on_failure t_on_reply t_relay t_replicate t_reply
        t_reply_by_callid t_reply_with_body t_wait_for_new_branches t_wait_no_more_branches
        t_was_cancelled t_write_req t_write_unix""",
    "sl": "sl_reply_error sl_send_reply",
    "signaling": "send_reply",
    "rr": "add_rr_param check_route_param is_direction loose_route record_route record_route_preset",
    "maxfwd": "is_maxfwd_lt mf_process_maxfwd_header",
    "sipmsgops": """add_body_part append_body_to_reply append_hf append_time append_to_reply
        append_urihf change_reply_status codec_delete codec_delete_except_re codec_delete_re
        codec_exists codec_exists_re codec_move_down codec_move_down_re codec_move_up
        codec_move_up_re get_glob_headers_values get_updated_body_part has_body has_body_part
        has_totag insert_hf is_audio_on_hold is_method is_present_hf is_privacy
        is_uri_user_e164 list_hdr_add_option list_hdr_has_option list_hdr_remove_option
        remove_body_part remove_hf remove_hf_glob remove_hf_re ruri_add_param ruri_del_param
        ruri_has_param ruri_tel2sip sip_to_json sipmsg_validate stream_delete stream_exists""",
    "textops": """replace replace_all replace_body replace_body_all replace_body_atonce search
        search_append search_append_body search_body subst subst_body subst_uri subst_user""",
    "cfgutils": """abort check_time_rec get_accurate_time get_dynamic_lock get_static_lock
        pkg_status rand_event rand_get_prob rand_reset_prob rand_set_prob
        release_dynamic_lock release_static_lock set_count set_select_weight shm_status
        shuffle_avps sleep strings_share_lock ts_usec_delta usleep""",
    "json": "json_link json_merge",
    "dialog": """create_dialog dlg_inc_cseq dlg_on_answer dlg_on_hangup dlg_on_timeout
        dlg_send_sequential fetch_dlg_value fix_route_dialog get_dialog_info get_dialog_vals
        get_dialogs_by_profile get_dialogs_by_val get_profile_size is_dlg_flag_set
        is_in_profile load_dialog_ctx match_dialog reset_dlg_flag set_dlg_flag
        set_dlg_profile set_dlg_sharing_tag store_dlg_value test_and_set_dlg_flag
        unload_dialog_ctx unset_dlg_profile validate_dialog""",
    "callops": "call_blind_replace call_transfer call_transfer_notify",
    "uac": """uac_auth uac_inc_cseq uac_replace_from uac_replace_to uac_restore_from
        uac_restore_to""",
    "registrar": """add_sock_hdr is_contact_registered is_ip_registered is_registered lookup
        remove remove_ip_port save""",
    "usrloc": "ul_add_key ul_del_key ul_get_key",
    "auth": """append_rpid_hf consume_credentials is_rpid_user_e164 proxy_challenge
        pv_proxy_authorize pv_www_authorize www_challenge""",
    "auth_db": """db_does_uri_exist db_get_auth_id db_is_from_authorized db_is_to_authorized
        proxy_authorize www_authorize""",
}
FUNCTION_MODULE = {f: m for m, fs in MODULE_FUNCTIONS.items() for f in fs.split()}

# Pseudo-variables that come from modules (the others used here are core: $var, $ru, $rU, $rd,
# $du, $fd, $td, $tu, $ci, $si, $sp, $hdr, $retcode, $rm, $rs, $rr, $cs, ...).
PVAR_MODULE = {"dlg_val": "dialog", "json": "json", "sig_local_totag": "signaling"}
PVAR_PREFIX_MODULE = {"DLG_": "dialog", "T_": "tm"}

# Modules each script must load. callapi needs the first set whatever the script; a production
# script also runs the registrar and both event transports callapi's event-ingest can use.
REQUIRED_MODULES = {"tm", "dialog", "callops", "mi_datagram", "json", "uac"}
REQUIRED_ONE_OF = [("event_datagram", "event_stream")]
REQUIRED_PRODUCTION = {
    "proto_udp", "proto_tcp", "sl", "signaling", "rr", "maxfwd", "sipmsgops", "usrloc",
    "registrar", "uac_auth", "event_datagram", "event_stream",
}
# module -> modules it needs loaded as well (one of each tuple).
MODULE_DEPENDS = {
    "dialog": [("tm",), ("rr",)],
    "callops": [("tm",), ("dialog",)],
    "uac": [("tm",), ("rr",), ("uac_auth",)],
    "registrar": [("usrloc",)],
    "mi_http": [("httpd",)],
    "signaling": [("sl", "tm")],
}

# create_dialog flags. 3.6: one letter each, read letter by letter, unknown letters skipped
# silently (modules/dialog/dlg_hash.h); 4.0: comma-separated names, anything else refused at
# start-up (modules/dialog/dlg_load.h), although `opensips -c` passes it.
FLAGS_36 = set("PpBRrE")
FLAGS_40 = {
    "bye-on-timeout", "options-ping-caller", "options-ping-callee", "reinvite-ping-caller",
    "reinvite-ping-callee", "end-on-race-condition", "auto-prack",
}
BYE_ON_TIMEOUT = {"3.6": "B", "4.0": "bye-on-timeout"}

# Module parameters that exist in one version only.
PARAMS_40_ONLY = {
    ("mi_datagram", "socket_buf_size"), ("httpd", "auth_username"), ("httpd", "auth_password"),
    ("httpd", "auth_realm"), ("dialog", "auto_prack_hangup_on_failure"),
    ("dialog", "auto_prack_fr_timeout"),
}
PARAMS_36_ONLY = {("usrloc", "db_mode")}
GLOBALS_36_ONLY = {"listen", "log_stderror", "log_facility", "log_name"}
# Defaults that differ between 3.6 and 4.0: a production script sets them, so that both
# versions behave the same (usrloc use_domain: 0 / 1; httpd ip: "*" / "127.0.0.1").
EXPLICIT_PARAMS = {("usrloc", "use_domain"), ("httpd", "ip")}

# Lines the 3.6 and 4.0 scripts (production pair, reference pair) may differ in; nothing else.
ALLOWED_VERSION_DIFFERENCES = [
    "a comment line of the file's opening comment block (it names the version)",
    'a create_dialog(...) call whose flags differ ("B" on 3.6, "bye-on-timeout" on 4.0)',
]

CALLAPI_ROUTES = ("callapi_referred", "callapi_ruri")
# How the main route calls them (whitespace aside; FLAGS: the version's create_dialog flags).
CALLAPI_CALL = (
    "route(callapi_referred);if($var(callapi_routed)==1){create_dialog(FLAGS);record_route();"
    "route(callapi_ruri);route(relay);}"
)

KEYWORDS = {
    "if", "else", "while", "switch", "case", "default", "break", "return", "exit", "drop",
    "route", "for", "in", "and", "or", "not", "xor", "NULL", "true", "false",
}
BLOCK_RE = re.compile(
    r"\b(route|failure_route|onreply_route|branch_route|local_route|startup_route|"
    r"timer_route|event_route|error_route)\b\s*(?:\[\s*([^\]]*?)\s*\])?\s*\{"
)


# ---------------------------------------------------------------------------------------------
# Reading a script


@dataclass
class Block:
    kind: str  # route, failure_route, local_route, ...
    name: str  # "" for the main route / unnamed blocks
    start: int  # offset of the block's keyword
    body_start: int  # offset just after "{"
    end: int  # offset of the closing "}"


@dataclass
class Script:
    path: Path
    version: str
    reference: bool
    raw: str
    code: str = ""  # comments blanked
    skel: str = ""  # comments and string contents blanked
    calls: str = ""  # skel with pseudo-variables blanked too
    line_starts: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    modules: dict[str, int] = field(default_factory=dict)  # module -> line
    modparams: list[tuple[str, str, str, int]] = field(default_factory=list)
    globals: list[tuple[str, str, int]] = field(default_factory=list)

    def line(self, offset: int) -> int:
        lo, hi = 0, len(self.line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.line_starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    def block_at(self, offset: int) -> Block | None:
        for b in self.blocks:
            if b.body_start <= offset < b.end:
                return b
        return None

    def block(self, kind: str, name: str = "") -> Block | None:
        for b in self.blocks:
            if b.kind == kind and b.name == name:
                return b
        return None


def blank(s: str) -> str:
    return "".join(c if c == "\n" else " " for c in s)


def scan(raw: str) -> tuple[str, str, list[tuple[int, str]]]:
    """Returns (code, skel, problems): comments blanked; strings' contents blanked as well."""
    code, skel, problems = [], [], []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "#":
            j = raw.find("\n", i)
            j = n if j < 0 else j
            code.append(blank(raw[i:j]))
            skel.append(blank(raw[i:j]))
            i = j
        elif raw.startswith("/*", i):
            depth, j = 0, i
            while j < n:
                if raw.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif raw.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                    if depth == 0:
                        break
                else:
                    j += 1
            if depth:
                problems.append((i, "comment /* never closed"))
            code.append(blank(raw[i:j]))
            skel.append(blank(raw[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and raw[j] != c:
                j += 2 if (c == '"' and raw[j] == "\\") else 1
            if j >= n:
                problems.append((i, "string never closed"))
                j = n - 1
            code.append(raw[i : j + 1])
            skel.append(c + blank(raw[i + 1 : j]) + (raw[j] if j > i else ""))
            i = j + 1
        else:
            code.append(c)
            skel.append(c)
            i += 1
    return "".join(code), "".join(skel), problems


def blank_pvars(skel: str) -> str:
    """Blanks $name, $name(...), $(...) (with transformations), keeping offsets."""
    out = list(skel)
    i, n = 0, len(skel)
    while i < n:
        if skel[i] != "$":
            i += 1
            continue
        j = i + 1
        m = re.match(r"[A-Za-z_]\w*", skel[j:])
        if m:
            j += m.end()
        if j < n and skel[j] == "(":
            depth = 0
            while j < n:
                if skel[j] in "({":
                    depth += 1
                elif skel[j] in ")}":
                    depth -= 1
                    if depth == 0:
                        j += 1
                        break
                j += 1
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = max(j, i + 1)
    return "".join(out)


def read_script(path: Path) -> tuple[Script | None, list[str]]:
    m = re.search(r"(3\.6|4\.0)", path.name)
    if not m:
        return None, [f"{path}: cannot tell the OpenSIPS version from the file name (3.6 or 4.0)"]
    try:
        raw = path.read_text()
    except OSError as e:
        return None, [f"{path}: cannot read: {e}"]
    s = Script(path=path, version=m.group(1), reference=path.name.startswith("reference-"), raw=raw)
    s.line_starts = [0] + [i + 1 for i, c in enumerate(raw) if c == "\n"]
    s.code, s.skel, problems = scan(raw)
    s.calls = blank_pvars(s.skel)
    errors = [f"{path}:{s.line(o)}: {msg}" for o, msg in problems]
    return s, errors


# ---------------------------------------------------------------------------------------------
# Checks. Each returns a list of "file:line: message".


def err(s: Script, offset_or_line: int, msg: str, is_line: bool = False) -> str:
    line = offset_or_line if is_line else s.line(offset_or_line)
    return f"{s.path}:{line}: {msg}"


def check_balance(s: Script) -> list[str]:
    errors, stack = [], []
    pairs = {")": "(", "}": "{", "]": "["}
    for i, c in enumerate(s.skel):
        if c in "({[":
            stack.append((c, i))
        elif c in ")}]":
            if not stack or stack[-1][0] != pairs[c]:
                errors.append(err(s, i, f"unbalanced '{c}'"))
                return errors
            stack.pop()
    for c, i in stack:
        errors.append(err(s, i, f"'{c}' never closed"))
    return errors


def find_blocks(s: Script) -> list[str]:
    """Top-level blocks (route{}, route[x]{}, failure_route[x]{}, local_route{}, ...)."""
    errors, depth, i = [], 0, 0
    sk = s.skel
    while i < len(sk):
        c = sk[i]
        if depth == 0:
            m = BLOCK_RE.match(sk, i)
            if m and (i == 0 or not (sk[i - 1].isalnum() or sk[i - 1] == "_")):
                body = m.end()
                d, j = 1, body
                while j < len(sk) and d:
                    if sk[j] == "{":
                        d += 1
                    elif sk[j] == "}":
                        d -= 1
                    j += 1
                name = (m.group(2) or "").strip().strip("\"'")
                if m.group(1) == "route" and name in ("0", "main"):
                    name = ""
                for b in s.blocks:
                    if b.kind == m.group(1) and b.name == name:
                        errors.append(err(s, i, f"{m.group(1)}[{name}] defined twice"))
                s.blocks.append(Block(m.group(1), name, i, body, j - 1))
                i = j
                continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        i += 1
    if s.block("route") is None:
        errors.append(err(s, 1, "no main route { ... }", is_line=True))
    return errors


def read_config(s: Script) -> list[str]:
    """loadmodule, modparam and global parameters, outside the route blocks."""
    errors = []
    for idx, line in enumerate(s.code.split("\n")):
        lineno = idx + 1
        off = s.line_starts[idx]
        if s.block_at(off) is not None:
            continue
        st = line.strip()
        if not st:
            continue
        m = re.fullmatch(r'loadmodule\s+"([^"]+)"', st)
        if m:
            mod = Path(m.group(1)).name
            mod = mod[:-3] if mod.endswith(".so") else mod
            if mod in s.modules:
                errors.append(err(s, lineno, f'module "{mod}" loaded twice', True))
            s.modules[mod] = lineno
            continue
        m = re.fullmatch(r'modparam\(\s*"([^"]+)"\s*,\s*"([^"]+)"\s*,\s*(.+?)\s*\)', st)
        if m:
            mod, param, value = m.group(1), m.group(2), m.group(3)
            if mod not in s.modules:
                errors.append(err(s, lineno, f'modparam of "{mod}" before (or without) its loadmodule', True))
            s.modparams.append((mod, param, value.strip().strip("\"'"), lineno))
            continue
        m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(.+)", st)
        if m:
            s.globals.append((m.group(1), m.group(2).strip(), lineno))
    return errors


def param(s: Script, mod: str, name: str) -> tuple[str, int] | None:
    found = None
    for m, p, v, line in s.modparams:
        if m == mod and p == name:
            found = (v, line)
    return found


def check_modules(s: Script) -> list[str]:
    errors = []
    required = set(REQUIRED_MODULES)
    if not s.reference:
        required |= REQUIRED_PRODUCTION
    for mod in sorted(required - set(s.modules)):
        errors.append(err(s, 1, f'module "{mod}" is not loaded (callapi needs it)', True))
    for group in REQUIRED_ONE_OF:
        if not any(m in s.modules for m in group):
            errors.append(err(s, 1, f"none of the modules {', '.join(group)} is loaded (callapi's event-ingest needs one)", True))
    for mod, needs in MODULE_DEPENDS.items():
        if mod not in s.modules:
            continue
        for group in needs:
            if not any(m in s.modules for m in group):
                errors.append(err(s, s.modules[mod], f'module "{mod}" needs {" or ".join(group)} loaded as well', True))
    return errors


def check_functions(s: Script) -> list[str]:
    errors = []
    for b in s.blocks:
        body = s.calls[b.body_start : b.end]
        for m in re.finditer(r"(?<![\w$.])([A-Za-z_]\w*)\s*\(", body):
            name = m.group(1)
            off = b.body_start + m.start(1)
            if name in KEYWORDS:
                continue
            if name in CORE_FUNCTIONS or (s.version == "4.0" and name in CORE_FUNCTIONS_40_ONLY):
                continue
            mod = FUNCTION_MODULE.get(name)
            if mod is None:
                errors.append(err(s, off, f"{name}(): a function check.py does not know; add it to FUNCTION_MODULE with its module"))
            elif mod not in s.modules:
                errors.append(err(s, off, f'{name}() belongs to module "{mod}", which is not loaded'))
        for m in re.finditer(r"\$\(?([A-Za-z_]\w*)", s.skel[b.body_start : b.end]):
            name = m.group(1)
            off = b.body_start + m.start(1)
            mod = PVAR_MODULE.get(name)
            if mod is None:
                mod = next((v for p, v in PVAR_PREFIX_MODULE.items() if name.startswith(p)), None)
            if mod and mod not in s.modules:
                errors.append(err(s, off, f'${name} belongs to module "{mod}", which is not loaded'))
    return errors


def check_routes_defined(s: Script) -> list[str]:
    errors, used = [], set()
    for m in re.finditer(r"(?<![\w$])route\s*\(\s*([^)\s]+)\s*\)", s.code):
        name = m.group(1).strip("\"'")
        used.add(("route", name))
        if s.block("route", name) is None:
            errors.append(err(s, m.start(), f"route({name}) is called but route[{name}] is not defined"))
    for fn, kind in (("t_on_failure", "failure_route"), ("t_on_reply", "onreply_route"), ("t_on_branch", "branch_route")):
        for m in re.finditer(rf"\b{fn}\s*\(\s*[\"']?([\w-]+)[\"']?\s*\)", s.code):
            used.add((kind, m.group(1)))
            if s.block(kind, m.group(1)) is None:
                errors.append(err(s, m.start(), f"{fn}(\"{m.group(1)}\"): {kind}[{m.group(1)}] is not defined"))
    for b in s.blocks:
        if b.kind in ("route", "failure_route", "onreply_route", "branch_route") and b.name and (b.kind, b.name) not in used:
            print(f"{s.path}:{s.line(b.start)}: warning: {b.kind}[{b.name}] is never used")
    return errors


def create_dialog_calls(s: Script) -> list[tuple[int, str | None]]:
    """(offset, flags literal or None) of every create_dialog call in a route block."""
    out = []
    for m in re.finditer(r"(?<![\w$.])create_dialog\s*\(([^)]*)\)", s.code):
        if s.block_at(m.start()) is None:
            continue
        arg = m.group(1).strip()
        if not arg:
            out.append((m.start(), None))
        elif arg[0] in "\"'" and arg[-1] == arg[0]:
            out.append((m.start(), arg[1:-1]))
        else:
            out.append((m.start(), "\0" + arg))  # not a literal
    return out


def check_create_dialog(s: Script) -> list[str]:
    errors = []
    calls = create_dialog_calls(s)
    if not calls:
        errors.append(err(s, 1, "create_dialog is never called: callapi sees no dialog", True))
    for off, flags in calls:
        if flags is None:
            errors.append(err(s, off, f'create_dialog() without flags: ask for BYE on timeout ("{BYE_ON_TIMEOUT[s.version]}" on {s.version})'))
            continue
        if flags.startswith("\0"):
            errors.append(err(s, off, "create_dialog's flags must be a string literal (check.py checks them)"))
            continue
        if s.version == "3.6":
            if "-" in flags or "," in flags or any(f in flags.lower() for f in FLAGS_40):
                errors.append(err(s, off, f'create_dialog("{flags}"): OpenSIPS 4.0 flag names in a 3.6 script; 3.6 reads the flags letter by letter and skips unknown letters silently, so this is not "bye-on-timeout" at all; use "B"'))
                continue
            bad = sorted(set(flags) - FLAGS_36)
            if bad:
                errors.append(err(s, off, f'create_dialog("{flags}"): unknown 3.6 flag letter(s) {"".join(bad)} (3.6 knows {"".join(sorted(FLAGS_36))}, and skips others silently)'))
            if "B" not in flags:
                errors.append(err(s, off, f'create_dialog("{flags}"): no "B" (BYE both ways when the dialog times out)'))
        else:
            names = [f.strip() for f in flags.split(",")]
            for name in names:
                if name in FLAGS_40:
                    continue
                if len(name) <= 2 and set(name) <= FLAGS_36:
                    errors.append(err(s, off, f'create_dialog("{flags}"): "{name}" is a 3.6 one-letter flag; 4.0 refuses it at start-up although opensips -c passes it; use "{BYE_ON_TIMEOUT["4.0"] if name == "B" else "the 4.0 name"}"'))
                else:
                    errors.append(err(s, off, f'create_dialog("{flags}"): "{name}" is not a 4.0 flag ({", ".join(sorted(FLAGS_40))})'))
            if "bye-on-timeout" not in names:
                errors.append(err(s, off, f'create_dialog("{flags}"): no "bye-on-timeout" (BYE both ways when the dialog times out)'))
    return errors


def check_callapi_calls(s: Script) -> list[str]:
    """route(callapi_referred) before every create_dialog, the way the reference calls it."""
    errors = []
    main = s.block("route")
    if main is None:
        return errors
    referred = [m.start() for m in re.finditer(r"(?<![\w$])route\s*\(\s*callapi_referred\s*\)", s.code)]
    if not referred:
        return [err(s, main.start, "the main route never calls route(callapi_referred) (before create_dialog, for initial INVITEs)")]
    if len(referred) > 1:
        errors.append(err(s, referred[1], "route(callapi_referred) is called more than once"))
    first = referred[0]
    if s.block_at(first) is not main:
        errors.append(err(s, first, "route(callapi_referred) must be called from the main route"))
    calls = create_dialog_calls(s)
    for off, _ in calls:
        if s.block_at(off) is not main:
            errors.append(err(s, off, "create_dialog outside the main route: check.py cannot tell route(callapi_referred) ran before it; create dialogs in the main route"))
        elif off < first:
            errors.append(err(s, off, "create_dialog before route(callapi_referred): callops strips ;osid= once the dialog exists, and route[callapi_referred] needs it"))
    # every create_dialog is followed by route(callapi_ruri) before the next one (production
    # scripts: the reference scripts' relay to other domains does without)
    in_main = [] if s.reference else sorted(off for off, _ in calls if s.block_at(off) is main)
    for k, off in enumerate(in_main):
        stop = in_main[k + 1] if k + 1 < len(in_main) else main.end
        if not re.search(r"(?<![\w$])route\s*\(\s*callapi_ruri\s*\)", s.code[off:stop]):
            errors.append(err(s, off, "create_dialog not followed by route(callapi_ruri): the callee's R-URI user (ruri_user) would not be applied"))
    # the call site, as in the reference scripts
    flat = re.sub(r"\s+", "", s.code[main.body_start : main.end])
    pattern = re.escape(CALLAPI_CALL).replace(re.escape("FLAGS"), r"(\"[^\"]*\")")
    if not re.search(pattern, flat):
        errors.append(err(s, first, "the main route does not call route(callapi_referred) the way the reference scripts do: "
                                    "route(callapi_referred); if ($var(callapi_routed) == 1) { create_dialog(FLAGS); record_route(); route(callapi_ruri); route(relay); }"))
    return errors


def block_text(s: Script, kind: str, name: str) -> tuple[str, int] | None:
    b = s.block(kind, name)
    if b is None:
        return None
    return s.raw[b.start : b.end + 1], b.start


def check_callapi_routes(s: Script, ref: Script | None) -> list[str]:
    errors = []
    for name in CALLAPI_ROUTES:
        mine = block_text(s, "route", name)
        if mine is None:
            errors.append(err(s, 1, f"route[{name}] is not defined", True))
            continue
        if ref is None or ref.path == s.path:
            continue
        theirs = block_text(ref, "route", name)
        if theirs is None:
            errors.append(err(s, 1, f"route[{name}]: {ref.path} has none to compare with", True))
            continue
        if mine[0] != theirs[0]:
            a, b = mine[0].split("\n"), theirs[0].split("\n")
            k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            errors.append(err(s, s.line(mine[1]) + k, f"route[{name}] differs from {ref.path} (line {ref.line(theirs[1]) + k} there); it must be byte-identical", True))
    return errors


def check_notify_refer(s: Script) -> list[str]:
    flat = re.sub(r"\s+", "", s.code)
    if re.search(r'is_method\("NOTIFY"\)&&\(?\$hdr\(Event\)[^{]*refer[^{]*\{[^{}]*?(exit|drop);', flat):
        return []
    return [err(s, 1, 'no in-dialog "NOTIFY with Event: refer -> exit": callops (mode param) answers those NOTIFYs itself and they must not be relayed', True)]


def check_settings(s: Script) -> list[str]:
    errors = []
    mode = param(s, "callops", "mode")
    if mode and mode[0] not in ("param", "0"):
        errors.append(err(s, mode[1], f'callops mode "{mode[0]}": callapi needs mode param (;osid= in the R-URI of a transfer\'s INVITE)', True))
    mp = param(s, "callops", "match_param")
    if mp and mp[0] != "osid":
        errors.append(err(s, mp[1], f'callops match_param "{mp[0]}": route[callapi_referred] reads ;osid=', True))
    rel = param(s, "event_stream", "reliable_mode")
    if rel and rel[0] not in ("0", "no", "false"):
        errors.append(err(s, rel[1], "event_stream reliable_mode: callapi's event-ingest reads notifications and answers no request", True))
    sock = param(s, "mi_datagram", "socket_name")
    if "mi_datagram" in s.modules:
        if sock is None:
            errors.append(err(s, s.modules["mi_datagram"], 'mi_datagram has no "socket_name": callapi\'s proxy-connector sends MI there', True))
        else:
            m = re.fullmatch(r"udp:(.+):(\d+)", sock[0])
            if not m:
                errors.append(err(s, sock[1], f'mi_datagram socket_name "{sock[0]}": callapi\'s proxy-connector speaks udp:HOST:PORT', True))
            elif not 1024 <= int(m.group(2)) <= 65535:
                errors.append(err(s, sock[1], f"mi_datagram socket_name port {m.group(2)}: mi_datagram refuses ports outside 1024-65535 at start-up", True))
    for mod, p, _, line in s.modparams:
        if s.version == "3.6" and (mod, p) in PARAMS_40_ONLY:
            errors.append(err(s, line, f'modparam("{mod}", "{p}") exists in OpenSIPS 4.0 only', True))
        if s.version == "4.0" and (mod, p) in PARAMS_36_ONLY:
            errors.append(err(s, line, f'modparam("{mod}", "{p}") was removed in OpenSIPS 4.0', True))
    for name, _, line in s.globals:
        if s.version == "4.0" and name in GLOBALS_36_ONLY:
            errors.append(err(s, line, f"global parameter {name} was removed in OpenSIPS 4.0", True))
    if not s.reference:
        for mod, p in sorted(EXPLICIT_PARAMS):
            if mod in s.modules and param(s, mod, p) is None:
                errors.append(err(s, s.modules[mod], f'set modparam("{mod}", "{p}") explicitly: its default differs between 3.6 and 4.0', True))
        errors += check_local_loop(s)
    return errors


def check_local_loop(s: Script) -> list[str]:
    """callapi's t_uac_dlg INVITE (ruri: the caller, no next_hop) must come back through route{}
    on this node: local_route sends it to one of this node's own UDP sockets."""
    b = s.block("local_route")
    if b is None:
        return [err(s, 1, "no local_route sending callapi's t_uac_dlg INVITEs back into route{} on this node", True)]
    m = re.search(r'\$du\s*=\s*"sip:([^":;]+):(\d+)"', s.code[b.body_start : b.end])
    if not m:
        return [err(s, b.start, 'local_route does not set $du = "sip:HOST:PORT" (this node\'s own socket)')]
    host, port = m.group(1), m.group(2)
    sockets = [(v, line) for n, v, line in s.globals if n in ("socket", "listen")]
    if not any(re.fullmatch(rf"udp:{re.escape(host)}:{port}(\s.*)?", v) for v, _ in sockets):
        return [err(s, b.body_start + m.start(), f"local_route loops to {host}:{port}, but no socket=udp:{host}:{port} is defined")]
    if host.startswith("127.") and len(sockets) > 1 and not any(n == "mhomed" and v == "1" for n, v, _ in s.globals):
        return [err(s, b.body_start + m.start(), "looping over the loopback with other sockets needs mhomed=1: a request received on 127.0.0.1 would otherwise be relayed from it")]
    return []


def check_pair(a: Script, b: Script) -> list[str]:
    """The 3.6 and 4.0 scripts may differ only in ALLOWED_VERSION_DIFFERENCES."""
    errors = []
    la, lb = a.raw.split("\n"), b.raw.split("\n")

    def header_len(lines: list[str]) -> int:
        k = 0
        while k < len(lines) and lines[k].lstrip().startswith("#"):
            k += 1
        return k

    ha, hb = header_len(la), header_len(lb)
    cd = re.compile(r'create_dialog\(\s*"[^"]*"\s*\)')

    def allowed(i: int, j: int) -> bool:
        if i < ha and j < hb:
            return True
        x, y = la[i], lb[j]
        return x != y and cd.search(x) is not None and cd.sub("create_dialog(F)", x) == cd.sub("create_dialog(F)", y)

    sm = difflib.SequenceMatcher(a=la, b=lb, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            continue
        if op == "replace" and i2 - i1 == j2 - j1 and all(allowed(i1 + k, j1 + k) for k in range(i2 - i1)):
            continue
        line_a, line_b = i1 + 1, j1 + 1
        errors.append(
            f"{a.path}:{line_a}: differs from {b.path}:{line_b} where 3.6 and 4.0 may not differ "
            f"(only: {'; '.join(ALLOWED_VERSION_DIFFERENCES)}): "
            f"{la[i1].strip() if i1 < len(la) and i1 < i2 else '(no line)'!r} / {lb[j1].strip() if j1 < len(lb) and j1 < j2 else '(no line)'!r}"
        )
    return errors


# ---------------------------------------------------------------------------------------------


def load(path: Path, cache: dict[Path, Script], errors: list[str]) -> Script | None:
    path = path.resolve()
    if path in cache:
        return cache[path]
    s, errs = read_script(path)
    errors += errs
    if s is not None:
        errors += find_blocks(s)
        errors += read_config(s)
    cache[path] = s
    return s


def counterpart(path: Path, version: str) -> Path:
    """The same script for the other version: beside it, else beside check.py."""
    other = "4.0" if version == "3.6" else "3.6"
    name = path.name.replace(version, other)
    p = path.parent / name
    return p if p.exists() else HERE / name


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] if argv else [HERE / f for f in DEFAULT_FILES]
    errors: list[str] = []
    cache: dict[Path, Script] = {}
    checked, pairs = 0, set()
    for path in files:
        s = load(path, cache, errors)
        if s is None:
            continue
        checked += 1
        unbalanced = check_balance(s)
        errors += unbalanced
        if not unbalanced:
            errors += per_script_checks(s, cache, errors)
        other = counterpart(s.path, s.version)
        key = frozenset((s.path, other.resolve()))
        if key not in pairs and other.exists():
            pairs.add(key)
            o = load(other, cache, errors)
            if o is not None:
                a, b = (s, o) if s.version == "3.6" else (o, s)
                errors += check_pair(a, b)
    seen, unique = set(), []
    for e in errors:
        if e not in seen:
            seen.add(e)
            unique.append(e)
    for e in unique:
        print(e, file=sys.stderr)
    print(f"opensips scripts: {checked} checked, {len(unique)} error(s)")
    return 1 if unique or not checked else 0


def per_script_checks(s: Script, cache: dict[Path, Script], errors: list[str]) -> list[str]:
    """Everything but the brace balance (an unbalanced script is not read further)."""
    out: list[str] = []
    out += check_modules(s)
    out += check_functions(s)
    out += check_routes_defined(s)
    out += check_create_dialog(s)
    out += check_callapi_calls(s)
    out += check_notify_refer(s)
    out += check_settings(s)
    # route[callapi_referred] / route[callapi_ruri]: as in the reference script of this
    # version (a reference script: as in the 3.6 reference, where they were written)
    ref_path = HERE / (f"reference-opensips-{s.version}.cfg" if not s.reference else "reference-opensips-3.6.cfg")
    ref = load(ref_path, cache, errors) if ref_path.exists() else None
    out += check_callapi_routes(s, ref)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
