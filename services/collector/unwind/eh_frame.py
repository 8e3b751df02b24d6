"""Unwind tables from .eh_frame (or .debug_frame): one sorted row per change of the rules.

A row says, from its program counter up to the next row's: how to find the CFA (the caller's
stack pointer) from rsp or rbp plus an offset, and where the caller's rbp is saved (an offset
from the CFA). On x86_64 the return address is always at CFA-8, so it needs no column. Rules a
row cannot express are kept as a row of a "stop" type, so that the BPF walker ends the stack
cleanly there and counts why, instead of reading garbage.

The CIE/FDE parser and the CFI interpreter are ours, over the section bytes: pyelftools (used
here only to find sections and segments) parses CFI through `construct` objects, about ten times
slower, and its decoder refuses whole FDEs on DW_CFA_GNU_args_size. Speed matters: the collector
builds a table for every file its processes map (python3.11: 64,000 rows). x86_64 only: the
register numbers and the CFA-8 return address are that ABI's; an arm64 table would add a column
for the link register.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

# Row types (struct unwind_row.cfa_type in bpf/cpu_sample.c).
CFA_NONE = 0  # no FDE covers this pc: the table says nothing here
CFA_RSP = 1  # CFA = rsp + offset
CFA_RBP = 2  # CFA = rbp + offset
CFA_PLT = 3  # .plt stubs: CFA = rsp + 8, + 8 more when (pc & 15) >= offset
CFA_STACK_END = 4  # the return address is undefined: the outermost frame (_start, clone)
CFA_UNSUPPORTED = 5  # a CFA rule no row expresses (another register, an expression)

RBP_LOST = -128  # rbp_offset8 value: the caller's rbp is not recoverable (kept as 0)

# struct unwind_row: u32 pc (ELF virtual address), u16 cfa_offset, u8 cfa_type,
# s8 rbp_offset8 (where the caller's rbp is saved, CFA-relative, in 8-byte units; 0: unchanged).
ROW = struct.Struct("<IHBb")

REG_RBP, REG_RSP, REG_RA = 6, 7, 16
# The .plt CFA expressions gcc and binutils emit: rsp + 8 + ((rip & 15) >= N) << 3.
_PLT_EXPR = {bytes([0x77, 8, 0x80, 0, 0x3f, 0x1a, lit, 0x2a, 0x33, 0x24, 0x22]): lit - 0x30
             for lit in (0x3a, 0x3b)}

class TableError(Exception):
    """The file gives no table (not ELF, no CFI, malformed); ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class UnwindTable:
    rows: bytes  # ROW-packed, sorted by pc
    fdes: int
    unsupported_rows: int
    segments: tuple[tuple[int, int, int], ...] = ()  # executable PT_LOAD: (offset, filesz, vaddr)

    def vaddr(self, file_offset: int) -> int | None:
        """The virtual address the file offset is loaded at (to turn a mapping into a bias)."""
        for offset, size, vaddr in self.segments:
            if offset <= file_offset < offset + size:
                return file_offset - offset + vaddr
        return None

    @property
    def count(self) -> int:
        return len(self.rows) // ROW.size

    def row_at(self, pc: int) -> tuple[int, int, int, int] | None:
        """The (pc, cfa_type, cfa_offset, rbp_offset) row covering pc: what BPF's search finds."""
        lo, hi, found = 0, self.count, None
        while lo < hi:
            mid = (lo + hi) // 2
            row_pc, cfa_offset, cfa_type, rbp8 = ROW.unpack_from(self.rows, mid * ROW.size)
            if row_pc <= pc:
                found, lo = (row_pc, cfa_type, cfa_offset, rbp8 * 8), mid + 1
            else:
                hi = mid
        return found


def build_table(path: str) -> UnwindTable:
    """The unwind table of one ELF file, addresses as the file's virtual addresses."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if elf.get_machine_arch() != "x64":
                raise TableError("unsupported_arch", elf.get_machine_arch())
            # Both when both are there: code built with -fno-asynchronous-unwind-tables -g has
            # its FDEs in .debug_frame while crt1.o still brings an .eh_frame for _start.
            fdes = []
            for name, eh in ((".eh_frame", True), (".debug_frame", False)):
                section = elf.get_section_by_name(name)
                if section is not None and section["sh_type"] != "SHT_NOBITS":
                    fdes.extend(_parse_entries(section.data(), section["sh_addr"], eh))
            if not fdes:
                raise TableError("no_cfi")
            segments = tuple((seg["p_offset"], seg["p_filesz"], seg["p_vaddr"])
                             for seg in elf.iter_segments()
                             if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1)
            table = _rows(fdes)
            return UnwindTable(table.rows, table.fdes, table.unsupported_rows, segments)
    except TableError:
        raise
    except OSError as e:
        raise TableError("unreadable", str(e)) from None
    except Exception as e:  # pyelftools raises many kinds on malformed input
        raise TableError("malformed", f"{type(e).__name__}: {e}") from None


class _State:
    """The rules of one row. Only what x86_64 unwinding needs is kept."""

    __slots__ = ("cfa_expr", "cfa_offset", "cfa_reg", "ra", "rbp")

    def __init__(self):
        self.cfa_reg, self.cfa_offset, self.cfa_expr = None, 0, None
        self.rbp = None  # None: unchanged; int: saved at CFA+n; "lost"
        self.ra = "ok"  # "ok" (CFA-8), "undefined", "other"

    def copy(self) -> _State:
        s = _State()
        s.cfa_reg, s.cfa_offset, s.cfa_expr, s.rbp, s.ra = (
            self.cfa_reg, self.cfa_offset, self.cfa_expr, self.rbp, self.ra)
        return s

    def encode(self) -> tuple[int, int, int]:
        """(cfa_type, cfa_offset, rbp_offset8) of this state."""
        if self.ra == "undefined":
            return CFA_STACK_END, 0, 0
        if self.ra != "ok":
            return CFA_UNSUPPORTED, 0, 0
        if self.cfa_expr is not None:
            threshold = _PLT_EXPR.get(self.cfa_expr)
            if threshold is None:
                return CFA_UNSUPPORTED, 0, 0
            cfa_type, offset = CFA_PLT, threshold
        elif self.cfa_reg in (REG_RSP, REG_RBP) and 0 <= self.cfa_offset <= 0xffff:
            cfa_type = CFA_RSP if self.cfa_reg == REG_RSP else CFA_RBP
            offset = self.cfa_offset
        else:
            return CFA_UNSUPPORTED, 0, 0
        if self.rbp is None:
            rbp8 = 0
        elif self.rbp == "lost" or self.rbp % 8 or not -127 <= self.rbp // 8 <= 127 or self.rbp == 0:
            rbp8 = RBP_LOST
        else:
            rbp8 = self.rbp // 8
        return cfa_type, offset, rbp8


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result, _bits, pos = _leb(data, pos)
    return result, pos


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    result, bits, pos = _leb(data, pos)
    if result >> (bits - 1):  # the last byte's sign bit
        result -= 1 << bits
    return result, pos


def _leb(data: bytes, pos: int) -> tuple[int, int, int]:
    """A LEB128 number's bits as unsigned, how many bits it has, and the position after it."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7f) << shift
        shift += 7
        if byte < 0x80:
            return result, shift, pos


_FIXED = {0x02: struct.Struct("<H"), 0x03: struct.Struct("<I"), 0x04: struct.Struct("<Q"),
          0x0a: struct.Struct("<h"), 0x0b: struct.Struct("<i"), 0x0c: struct.Struct("<q"),
          0x00: struct.Struct("<Q")}


_ADVANCE = {0x02: struct.Struct("<B"), 0x03: struct.Struct("<H"), 0x04: struct.Struct("<I")}


def _pointer(data: bytes, pos: int, encoding: int, base: int) -> tuple[int, int]:
    """A DW_EH_PE-encoded pointer at pos; base is the section's address (for pcrel)."""
    if encoding == 0xff:  # omitted
        return 0, pos
    form = encoding & 0x0f
    at = pos
    if form == 0x01:
        value, pos = _uleb(data, pos)
    elif form == 0x09:
        value, pos = _sleb(data, pos)
    else:
        fmt = _FIXED.get(form)
        if fmt is None:
            raise TableError("malformed", f"pointer encoding {encoding:#x}")
        value = fmt.unpack_from(data, pos)[0]
        pos += fmt.size
    if encoding & 0x70 == 0x10:  # pcrel
        value += base + at
    elif encoding & 0x70 not in (0x00,):
        raise TableError("malformed", f"pointer application {encoding:#x}")
    return value & 0xffffffffffffffff, pos


@dataclass
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    pointer_encoding: int
    augmented: bool
    instructions: bytes
    initial: _State | None = None


def _parse_entries(data: bytes, base: int, eh: bool):
    """(start, size, cie, instructions) of every FDE of a .eh_frame (eh) or .debug_frame."""
    cies: dict[int, _Cie] = {}
    pos, end = 0, len(data)
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    while pos + 4 <= end:
        start = pos
        length = u32.unpack_from(data, pos)[0]
        pos += 4
        offset_size = 4
        if length == 0xffffffff:
            length = u64.unpack_from(data, pos)[0]
            pos += 8
            offset_size = 8
        if length == 0:
            if eh:
                break  # the terminator
            continue  # .debug_frame padding
        entry_end = pos + length
        if entry_end > end:
            raise TableError("malformed", "entry past the section's end")
        id_at = pos
        cie_id = (u32 if offset_size == 4 else u64).unpack_from(data, pos)[0]
        pos += offset_size
        is_cie = cie_id == 0 if eh else cie_id in (0xffffffff, 0xffffffffffffffff)
        if is_cie:
            cies[start] = _parse_cie(data, pos, entry_end)
        else:
            cie_at = id_at - cie_id if eh else cie_id
            cie = cies.get(cie_at)
            if cie is None:
                raise TableError("malformed", f"FDE at {start:#x} without its CIE")
            encoding = cie.pointer_encoding if eh else 0x00
            pc, pos = _pointer(data, pos, encoding, base)
            size, pos = _pointer(data, pos, encoding & 0x0f, base)
            if cie.augmented:
                skip, pos = _uleb(data, pos)
                pos += skip
            yield pc, size, cie, data[pos:entry_end]
        pos = entry_end


def _parse_cie(data: bytes, pos: int, end: int) -> _Cie:
    version = data[pos]
    pos += 1
    nul = data.index(0, pos)
    augmentation = data[pos:nul].decode("ascii", "replace")
    pos = nul + 1
    if version >= 4:
        pos += 2  # address_size, segment_size (.debug_frame v4)
    if "eh" in augmentation:
        pos += 8
    code_align, pos = _uleb(data, pos)
    data_align, pos = _sleb(data, pos)
    if version == 1:
        ra, pos = data[pos], pos + 1
    else:
        ra, pos = _uleb(data, pos)
    encoding = 0x00
    augmented = augmentation.startswith("z")
    if augmented:
        size, pos = _uleb(data, pos)
        after = pos + size
        for c in augmentation[1:]:
            if c == "R":
                encoding = data[pos]
                pos += 1
            elif c == "L":
                pos += 1
            elif c == "P":
                personality = data[pos]
                _, pos = _pointer(data, pos + 1, personality & 0x7f, 0)
            elif c in "SB":
                continue
            else:
                break  # unknown: the size says where the instructions start
        pos = after
    return _Cie(code_align, data_align, ra, encoding, augmented, data[pos:end])


def _apply(code: bytes, state: _State, initial: _State | None, cie: _Cie, emit, pc: int,
           encoding: int) -> int:
    """Run CFI instructions from pc on state; emit(pc, state) before each advance."""
    caf, daf = cie.code_align, cie.data_align
    stack: list[tuple] = []
    pos, end = 0, len(code)
    while pos < end:
        op = code[pos]
        pos += 1
        high = op & 0xc0
        if high == 0x40:  # advance_loc
            emit(pc, state)
            pc += (op & 0x3f) * caf
            continue
        if high == 0x80:  # offset
            value, pos = _uleb(code, pos)
            _set_reg(state, op & 0x3f, value * daf)
            continue
        if high == 0xc0:  # restore
            _restore(state, initial, op & 0x3f)
            continue
        if op == 0x00 or op == 0x2d:  # nop, AARCH64_negate_ra_state
            continue
        if op in (0x02, 0x03, 0x04):  # advance_loc1/2/4
            fmt = _ADVANCE[op]
            delta = fmt.unpack_from(code, pos)[0]
            pos += fmt.size
            emit(pc, state)
            pc += delta * caf
        elif op == 0x01:  # set_loc
            emit(pc, state)
            pc, pos = _pointer(code, pos, encoding & 0x0f, 0)
        elif op == 0x0c:  # def_cfa
            state.cfa_reg, pos = _uleb(code, pos)
            state.cfa_offset, pos = _uleb(code, pos)
            state.cfa_expr = None
        elif op == 0x12:  # def_cfa_sf
            state.cfa_reg, pos = _uleb(code, pos)
            offset, pos = _sleb(code, pos)
            state.cfa_offset, state.cfa_expr = offset * daf, None
        elif op == 0x0d:  # def_cfa_register
            state.cfa_reg, pos = _uleb(code, pos)
            state.cfa_expr = None
        elif op == 0x0e:  # def_cfa_offset
            state.cfa_offset, pos = _uleb(code, pos)
        elif op == 0x13:  # def_cfa_offset_sf
            offset, pos = _sleb(code, pos)
            state.cfa_offset = offset * daf
        elif op == 0x0f:  # def_cfa_expression
            size, pos = _uleb(code, pos)
            state.cfa_expr = bytes(code[pos:pos + size])
            pos += size
        elif op in (0x05, 0x11, 0x2f):  # offset_extended(_sf), GNU_negative_offset_extended
            reg, pos = _uleb(code, pos)
            if op == 0x11:
                offset, pos = _sleb(code, pos)
            else:
                offset, pos = _uleb(code, pos)
                offset = -offset if op == 0x2f else offset
            _set_reg(state, reg, offset * daf)
        elif op == 0x06:  # restore_extended
            reg, pos = _uleb(code, pos)
            _restore(state, initial, reg)
        elif op == 0x07:  # undefined
            reg, pos = _uleb(code, pos)
            _set_reg(state, reg, "undefined")
        elif op == 0x08:  # same_value
            reg, pos = _uleb(code, pos)
            _set_reg(state, reg, None)
        elif op in (0x09, 0x14, 0x15):  # register, val_offset(_sf)
            reg, pos = _uleb(code, pos)
            _, pos = (_sleb if op == 0x15 else _uleb)(code, pos)
            _set_reg(state, reg, "other")
        elif op in (0x10, 0x16):  # expression, val_expression
            reg, pos = _uleb(code, pos)
            size, pos = _uleb(code, pos)
            pos += size
            _set_reg(state, reg, "other")
        elif op == 0x0a:  # remember_state
            stack.append((state.cfa_reg, state.cfa_offset, state.cfa_expr, state.rbp, state.ra))
        elif op == 0x0b:  # restore_state
            if stack:
                (state.cfa_reg, state.cfa_offset, state.cfa_expr, state.rbp,
                 state.ra) = stack.pop()
        elif op == 0x2e:  # GNU_args_size
            _, pos = _uleb(code, pos)
        else:
            raise TableError("unknown_cfi_opcode", hex(op))
    return pc


def _restore(state: _State, initial: _State | None, reg: int) -> None:
    if initial is None:
        return
    if reg == REG_RBP:
        state.rbp = initial.rbp
    elif reg == REG_RA:
        state.ra = initial.ra


def _set_reg(state: _State, reg: int, rule) -> None:
    if reg == REG_RBP:
        state.rbp = "lost" if rule in ("undefined", "other") else rule
    elif reg == REG_RA:
        if rule == -8:
            state.ra = "ok"
        elif rule == "undefined":
            state.ra = "undefined"
        else:
            state.ra = "other"


def _rows(fdes) -> UnwindTable:
    fdes = sorted(fdes, key=lambda f: f[0])
    out: list[tuple[int, int, int, int]] = []  # (pc, cfa_type, cfa_offset, rbp8)
    unsupported = 0

    def add(pc: int, cfa_type: int, offset: int, rbp8: int) -> None:
        nonlocal unsupported
        if out and out[-1][0] == pc:
            out.pop()  # a later rule at the same pc wins (zero-length advances, adjacent FDEs)
        if out and out[-1][1:] == (cfa_type, offset, rbp8):
            return  # same rules as the row before: no new row
        if cfa_type == CFA_UNSUPPORTED:
            unsupported += 1
        out.append((pc, cfa_type, offset, rbp8))

    for start, size, cie, code in fdes:
        end = start + size
        if size == 0 or (out and start < out[-1][0]):
            continue  # empty, or overlaps the FDE before it: keep the first one
        if cie.initial is None:
            cie.initial = _State()
            _apply(cie.instructions, cie.initial, None, cie, lambda pc, s: None, 0,
                   cie.pointer_encoding)
        state = cie.initial.copy()
        rows_of_fde: list[tuple[int, tuple[int, int, int]]] = []

        def emit(pc: int, s: _State, rows_of_fde=rows_of_fde) -> None:
            rows_of_fde.append((pc, s.encode()))

        last_pc = _apply(code, state, cie.initial, cie, emit, start, cie.pointer_encoding)
        emit(last_pc, state)
        for pc, (cfa_type, offset, rbp8) in rows_of_fde:
            if start <= pc < end:
                add(pc, cfa_type, offset, rbp8)
        add(end, CFA_NONE, 0, 0)  # replaced by the next FDE's first row when it starts here
    if out and out[-1][0] > 0xffffffff:
        raise TableError("addresses_beyond_4g")
    rows = b"".join(ROW.pack(pc, offset, cfa_type, rbp8) for pc, cfa_type, offset, rbp8 in out)
    return UnwindTable(rows=rows, fdes=len(fdes), unsupported_rows=unsupported)
