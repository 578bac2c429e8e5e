"""Property-based fuzzing of ``udfc_ref.load``.

Random byte mutations of a valid file (flip, truncate, insert) and random
graph / tensor edits: ``load`` either returns a model whose forward pass runs
(and whose output has the inferred shape) or raises a UDFCError; never
another exception, never a hang.  Hostile tensor/node names (quotes,
newlines, NUL, unicode, code, 10 kB) are data; header and graph sizes are
bounded (tensor-count and node-count limits, chains in any order).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tempfile
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

import udfc_ref
from udfc_ref import Model, Node, UDFCError
from udfc_ref.graph import OPS
from udfc_ref.io import to_bytes
from udfc_ref.quantize import quantize

from helpers import bn_params

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def small_model() -> Model:
    """Every op family once, two quantized tensors (packed 4-bit, 8-bit asymmetric)."""
    rng = np.random.default_rng(1)
    t, n = {}, []
    t["c0.weight"] = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    t["c0.bias"] = rng.standard_normal(4).astype(np.float32)
    n.append(Node("c0", "conv2d", ["x"], "c0", {"padding": 1}, {"weight": "c0.weight", "bias": "c0.bias"}))
    n.append(Node("b0", "batch_norm", ["c0"], "b0", {"eps": 1e-5}, bn_params(rng, 4, "b0", t)))
    n.append(Node("r0", "relu", ["b0"], "r0"))
    t["c1.weight"] = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    n.append(Node("c1", "conv2d", ["r0"], "c1", {"padding": [1, 1, 1, 1], "groups": 2}, {"weight": "c1.weight"}))
    n.append(Node("add", "add", ["c1", "r0"], "add"))
    n.append(Node("r6", "relu6", ["add"], "r6"))
    n.append(Node("cat", "concat", ["r6", "r0"], "cat", {"axis": 1}))
    n.append(Node("mp", "max_pool2d", ["cat"], "mp", {"kernel": 2, "stride": 2}))
    n.append(Node("ap", "avg_pool2d", ["mp"], "ap", {"kernel": 3, "stride": 1, "padding": 1,
                                                     "count_include_pad": False}))
    n.append(Node("id", "identity", ["ap"], "id"))
    n.append(Node("gap", "global_avg_pool", ["id"], "gap", {"keepdims": True}))
    n.append(Node("flat", "flatten", ["gap"], "flat"))
    t["fc.weight"] = rng.standard_normal((3, 8)).astype(np.float32)
    t["fc.bias"] = np.zeros(3, np.float32)
    n.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight", "bias": "fc.bias"}))
    m = Model(t, n, "x", (2, 6, 6))
    for name, bits, sym in (("c1.weight", 4, True), ("fc.weight", 8, False)):
        m.quant[name] = q = quantize(m.tensors[name], bits, symmetric=sym)
        m.tensors[name] = q.dequantize()
    return m


VALID = to_bytes(small_model())
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@contextmanager
def time_limit(seconds: int):
    """Turn a hang into a test failure (SIGALRM; main thread, Linux)."""
    def boom(*_):
        raise TimeoutError(f"load/forward took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load_is_safe(data: bytes) -> Model | None:
    """Write ``data``, load it; check the contract; return the model or None."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "fuzz.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        with time_limit(20), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                m = udfc_ref.load(p)
            except UDFCError as e:
                assert str(e) and "\n" not in str(e)
                m = None
            if m is not None:
                n_in = int(np.prod(m.input_shape))
                if n_in <= 200_000 and sum(int(np.prod(s)) for s in m.shapes.values()) <= 5_000_000:
                    x = np.random.default_rng(0).standard_normal((2,) + m.input_shape).astype(np.float32)
                    y = m.forward(x)
                    assert y.shape == (2,) + m.shapes[m.output_name]
                # what loads also saves, and reloads to the same tensors
                m2 = udfc_ref.load(_write(d, to_bytes(m)))
                assert set(m2.tensors) == set(m.tensors)
                for k in m.tensors:
                    assert m2.tensors[k].tobytes() == m.tensors[k].tobytes(), k
        with open(p, "rb") as f:
            assert f.read() == data  # the input is never modified
    return m


def _write(d, data):
    p = os.path.join(d, "again.safetensors")
    with open(p, "wb") as f:
        f.write(data)
    return p


def test_valid_file_passes_the_contract():
    m = load_is_safe(VALID)
    assert m is not None and m.quant["c1.weight"].bits == 4


# ------------------------------------------------------------ byte mutations

pos_any = st.integers(0, len(VALID) - 1)
pos_header = st.integers(0, HEADER_END - 1)
position = st.one_of(pos_header, pos_header, pos_any)
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(0, 255)),
    st.tuples(st.just("bit"), position, st.integers(0, 7)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), position, st.integers(1, 8)),
    st.tuples(st.just("truncate"), pos_any, st.just(0)),
)


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in muts:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] = arg
        elif kind == "bit" and b:
            b[pos] ^= 1 << arg
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=4))
def test_byte_mutations(muts):
    load_is_safe(mutate(VALID, muts))


# textual edits of the JSON header (digits, quotes, brackets) reach the graph parser far more often
json_edit = st.tuples(st.integers(8, HEADER_END - 1), st.sampled_from(list(b'0123456789-."[]{},:eE ')))


@FUZZ
@given(st.lists(json_edit, min_size=1, max_size=3))
def test_header_text_edits(edits):
    b = bytearray(VALID)
    for pos, ch in edits:
        b[pos] = ch
    load_is_safe(bytes(b))


# ------------------------------------------------------------ graph edits

def _split():
    from safetensors.numpy import load as st_load

    meta = json.loads(VALID[8:HEADER_END])["__metadata__"]
    return dict(st_load(VALID)), dict(meta)


TENSORS, META = _split()
GRAPH = json.loads(META["graph"])
ATTR_KEYS = ["stride", "padding", "dilation", "groups", "eps", "kernel", "keepdims", "count_include_pad", "axis",
             "start_dim"]
OP_KEYS = {"conv2d": ["stride", "padding", "dilation", "groups"], "batch_norm": ["eps"],
           "max_pool2d": ["kernel", "stride", "padding"], "avg_pool2d": ["kernel", "stride", "padding",
                                                                        "count_include_pad"],
           "global_avg_pool": ["keepdims"], "concat": ["axis"], "flatten": ["start_dim"]}
attr_value = st.one_of(
    st.integers(-3, 5), st.sampled_from([0, 10**6, 10**12, 2**63, -2**63, 10**400, 4.0, 0.5, "4", "false", [],
                                         [1, 1, 1, 1], [10**9, 1], [2.0, 2], float("nan"), float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=3),
    st.lists(st.integers(-2, 4), max_size=5), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool"])
shape = st.lists(st.integers(0, 9), min_size=0, max_size=5)

edit = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("duplicate"), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("rename_input"), st.integers(0, 99), st.integers(0, 3), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("attr"), st.integers(0, 99), st.integers(0, 9), attr_value, st.booleans()),
    st.tuples(st.just("op"), st.integers(0, 99), st.sampled_from(sorted(OPS) + ["swishy", ""])),
    st.tuples(st.just("output"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("shape"), st.sampled_from(sorted(TENSORS)), shape, dtypes),
    st.tuples(st.just("drop_tensor"), st.sampled_from(sorted(TENSORS))),
    st.tuples(st.just("param"), st.integers(0, 99), st.sampled_from(["weight", "bias", "running_var", "x"]),
              st.sampled_from(sorted(TENSORS))),
    st.tuples(st.just("input_shape"), st.lists(st.integers(-1, 12), min_size=2, max_size=4)),
    st.tuples(st.just("qtable"), st.sampled_from(["c1.weight", "fc.weight"]),
              st.sampled_from(["bits", "symmetric", "per_channel", "shape", "dtype", "packed"]), attr_value),
)


def apply_edits(edits) -> bytes:
    t = {k: v.copy() for k, v in TENSORS.items()}
    meta = dict(META)
    g = json.loads(META["graph"])
    qt = json.loads(META["quantization"])
    inp = json.loads(META["input"])
    for e in edits:
        kind = e[0]
        i = e[1] % len(g) if g and isinstance(e[1], int) else 0
        if kind == "delete" and g:
            del g[i]
        elif kind == "duplicate" and g:
            d = json.loads(json.dumps(g[i]))
            if e[2]:
                d["name"] += "_dup"
                d["output"] += "_dup"
            g.insert(i, d)
        elif kind == "swap" and g:
            j = e[2] % len(g)
            g[i], g[j] = g[j], g[i]
        elif kind == "rename_input" and g:
            ins = g[i]["inputs"]
            values = ["x"] + [d["output"] for d in g]
            new = values[e[3] % len(values)] if e[4] else f"v{e[3]}"
            if ins:
                ins[e[2] % len(ins)] = new
            else:
                ins.append(new)
        elif kind == "attr" and g:
            keys = OP_KEYS.get(g[i]["op"], ATTR_KEYS) if e[4] else ATTR_KEYS
            g[i].setdefault("attrs", {})[keys[e[2] % len(keys)]] = e[3]
        elif kind == "op" and g:
            g[i]["op"] = e[2]
        elif kind == "output" and g:
            g[i]["output"] = g[e[2] % len(g)]["output"]
        elif kind == "shape":
            n = int(np.prod(e[2])) if e[2] else 1
            t[e[1]] = (np.arange(n) % 5).astype(e[3]).reshape(e[2])
        elif kind == "drop_tensor":
            t.pop(e[1], None)
        elif kind == "param" and g:
            g[i].setdefault("params", {})[e[2]] = e[3]
        elif kind == "input_shape":
            inp["shape"] = e[1]
        elif kind == "qtable":
            qt[e[1]][e[2]] = e[3]
    meta["graph"] = json.dumps(g)
    meta["quantization"] = json.dumps(qt)
    meta["input"] = json.dumps(inp)
    return st_save(t, metadata=meta)


@FUZZ
@given(st.lists(edit, min_size=1, max_size=4))
def test_graph_edits(edits):
    load_is_safe(apply_edits(edits))


def test_graph_edits_that_keep_the_model_valid_still_run():
    # a reorder of independent nodes is not an error: toposort restores it
    m = load_is_safe(apply_edits([("swap", 2, 3)]))
    assert m is not None and [n.name for n in m.nodes][:2] == ["c0", "b0"]


# ------------------------------------------------- issue 9: hostile names

HOSTILE = [
    'classifier.3.b" + str(getattr(__import__("os"), "system")("true")) + "',
    "__import__('os').system('true')",
    "line\nbreak", "tab\there", "cr\rhere", "nul\x00byte", "quote'single", 'quote"double', "back\\slash",
    "ünïcödé.wéight", "名前.重み", "emoji.🙂", "\u202eRTL", "", " ", ".", "..", "a" * 10_000,
    "{}", "[]", "null", "__metadata__x", "x.weight_scal",
]
names = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30))


def renamed(model: Model, new_names: list[str]) -> Model:
    """``model`` with every tensor and node renamed (in order) from ``new_names``."""
    t_old = sorted(model.tensors)
    tmap = dict(zip(t_old, new_names[:len(t_old)]))
    nmap = dict(zip([n.name for n in model.nodes], new_names[len(t_old):]))
    nodes = [Node(nmap[n.name], n.op, list(n.inputs), n.output, dict(n.attrs), {r: tmap[t] for r, t in n.params.items()})
             for n in model.nodes]
    quant = {tmap[k]: q for k, q in model.quant.items()}
    return Model({tmap[k]: v for k, v in model.tensors.items()}, nodes, model.input_name, model.input_shape,
                 output_name=model.output_name, quant=quant)


BASE = small_model()
N_NAMES = len(BASE.tensors) + len(BASE.nodes)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(names, min_size=N_NAMES, max_size=N_NAMES, unique=True))
def test_hostile_names_round_trip_as_data(new_names):
    """Any tensor/node names - quotes, newlines, NUL, unicode, code, 10 kB -
    are data: the file saves and loads with exactly these names and the same
    numbers, or save refuses it with one FormatError (a reserved or colliding
    name), and nothing is ever evaluated."""
    m = renamed(BASE, new_names)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "h.safetensors")
        try:
            udfc_ref.save(m, p)
        except UDFCError as e:
            assert "\n" not in str(e) and ("reserved" in str(e) or "used twice" in str(e)), str(e)
            assert os.listdir(d) == []
            return
        back = load_is_safe(open(p, "rb").read())
    assert back is not None
    assert sorted(back.tensors) == sorted(m.tensors) and [n.name for n in back.nodes] == [n.name for n in m.nodes]
    x = np.random.default_rng(0).standard_normal((2,) + m.input_shape).astype(np.float32)
    assert np.array_equal(back.forward(x), m.forward(x))


def test_reserved_and_colliding_names_are_refused_by_save(tmp_path):
    m = renamed(BASE, ["__metadata__"] + [f"n{i}" for i in range(N_NAMES - 1)])
    with pytest.raises(UDFCError, match="reserved"):
        udfc_ref.save(m, tmp_path / "a.safetensors")
    # a float parameter named like the scale of the quantized "c1.weight"
    m = small_model()
    m.tensors["c1.weight_scale"] = m.tensors.pop("c0.bias")
    m.node("c0").params["bias"] = "c1.weight_scale"
    with pytest.raises(UDFCError, match="used twice"):
        udfc_ref.save(m, tmp_path / "b.safetensors")
    assert os.listdir(tmp_path) == []


@settings(max_examples=40, deadline=None, derandomize=True)
@given(names, st.sampled_from(["op", "inputs", "output", "param"]))
def test_hostile_names_in_a_broken_file_give_a_one_line_error(name, where):
    """The error message names the culprit with repr(): a newline or a quote
    in a name never breaks the one-line error."""
    from udfc_ref.cli import main

    t, meta = dict(TENSORS), dict(META)
    g = json.loads(META["graph"])
    g[2]["name"] = name
    if where == "op":
        g[2]["op"] = name + "?"
    elif where == "inputs":
        g[2]["inputs"] = [name + "?"]
    elif where == "output":
        g[2]["output"] = "x"  # written twice: the message names the node
    else:
        g[2]["params"] = {"weight": name + "?"}
    meta["graph"] = json.dumps(g)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "b.safetensors")
        with open(p, "wb") as f:
            f.write(st_save(t, metadata=meta))
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["info", p])
    assert code == 1
    assert err.getvalue().startswith("udfc: error: ") and err.getvalue().count("\n") == 1, err.getvalue()


# ------------------------------------------------- issue 9: header and graph sizes

def _zero_size_tensors(n: int) -> bytes:
    """VALID plus ``n`` unused zero-size tensors (the issue's 1.4 M-entry attack, scaled down)."""
    h = json.loads(VALID[8:HEADER_END])
    for i in range(n):
        h[f"pad{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    hb = json.dumps(h, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + VALID[HEADER_END:]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 40), st.integers(1, 40))
def test_tensor_count_limit_is_exact(extra, limit):
    """With MAX_TENSORS = ``limit``, a header of exactly ``limit`` tensors
    loads and one more is refused while parsing."""
    n_real = len(json.loads(VALID[8:HEADER_END])) - 1
    old = udfc_ref.io.MAX_TENSORS
    udfc_ref.io.MAX_TENSORS = limit
    try:
        data = _zero_size_tensors(extra)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "n.safetensors")
            with open(p, "wb") as f:
                f.write(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    udfc_ref.load(p)
                    ok = True
                except UDFCError as e:
                    ok = False
                    assert f"more than {limit:,} tensors" in str(e)
    finally:
        udfc_ref.io.MAX_TENSORS = old
    assert ok == (n_real + extra <= limit)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 3000), st.randoms(use_true_random=False))
def test_chains_in_any_order_load_in_graph_order(n, rnd):
    """An identity chain of n nodes listed in a random order loads in
    dependency order and computes the identity."""
    nodes = [{"name": f"i{k}", "op": "identity", "inputs": [f"v{k - 1}" if k else "x"], "output": f"v{k}"}
             for k in range(n)]
    rnd.shuffle(nodes)
    meta = {"format": "udfc-ref", "format_version": "1", "graph": json.dumps(nodes),
            "input": json.dumps({"name": "x", "shape": [1, 2, 2]}), "output": f"v{n - 1}"}
    m = load_is_safe(st_save({}, metadata=meta))
    assert m is not None and [nd.name for nd in m.nodes] == [f"i{k}" for k in range(n)]


def test_reversed_20k_node_file_loads():
    """Quadratic graph code needed ~140 s for 20,000 reversed nodes; the file
    loads (parse, validate, toposort) in about a second."""
    n = 20_000
    nodes = [{"name": f"i{k}", "op": "identity", "inputs": [f"v{k - 1}" if k else "x"], "output": f"v{k}"}
             for k in range(n)][::-1]
    meta = {"format": "udfc-ref", "format_version": "1", "graph": json.dumps(nodes),
            "input": json.dumps({"name": "x", "shape": [1, 2, 2]}), "output": f"v{n - 1}"}
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "chain.safetensors")
        with open(p, "wb") as f:
            f.write(st_save({}, metadata=meta))
        m = udfc_ref.load(p)
    assert m.nodes[0].name == "i0" and m.nodes[-1].name == f"i{n - 1}"


def test_node_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(udfc_ref.io, "MAX_NODES", 50)
    nodes = [{"name": f"i{k}", "op": "identity", "inputs": [f"v{k - 1}" if k else "x"], "output": f"v{k}"}
             for k in range(51)]
    meta = {"format": "udfc-ref", "format_version": "1", "graph": json.dumps(nodes),
            "input": json.dumps({"name": "x", "shape": [1, 2, 2]})}
    p = tmp_path / "g.safetensors"
    p.write_bytes(st_save({}, metadata=meta))
    with pytest.raises(UDFCError, match="51 nodes .at most 50"):
        udfc_ref.load(p)
