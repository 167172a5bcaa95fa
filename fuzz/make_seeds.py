#!/usr/bin/env python3
"""Builds the seed corpora under fuzz/corpus/<target>/ (standard library only).

Sources: the shared failing cases (their small input files, or the files their scripts generate: pass the
directory the scripts wrote to as SEEDS, default /tmp/seeds, and the cases directory as CASES), the repo's HF
fixtures (tests/fixtures/hf: header-only truncations, manifest entries, config.json built from the routing),
and hand-written router option strings and TOML files. Usage: python3 fuzz/make_seeds.py [SEEDS] [CASES]
"""
import glob, json, os, re, struct, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = sys.argv[1] if len(sys.argv) > 1 else '/tmp/seeds'
CASES = sys.argv[2] if len(sys.argv) > 2 else '/work/shared/cases'
SEP = b'#@FILE@#'
HF = os.path.join(ROOT, 'tests', 'fixtures', 'hf')


def out(target, name, data):
    d = os.path.join(ROOT, 'fuzz', 'corpus', target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    open(os.path.join(d, name), 'wb').write(data)


def small(pattern, limit=16384):
    return [p for p in sorted(glob.glob(pattern, recursive=True))
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) <= limit]


def st(tensors, meta=None):
    """A safetensors file from {name: (dtype, shape, bytes)}."""
    header, data = {}, b''
    for n, (dt, shape, raw) in tensors.items():
        header[n] = {'dtype': dt, 'shape': shape, 'data_offsets': [len(data), len(data) + len(raw)]}
        data += raw
    if meta:
        header['__metadata__'] = meta
    h = json.dumps(header).encode()
    h += b' ' * (-len(h) % 8)
    return struct.pack('<Q', len(h)) + h + data


def f32(n, scale=0.1):
    return struct.pack(f'<{n}f', *[((i * 7) % 11 - 5) * scale for i in range(n)])


def header_only(path):
    raw = open(path, 'rb').read()
    (n,) = struct.unpack('<Q', raw[:8])
    return raw[:8 + n]


# --- safetensors files: checkpoint_file, hidden_safetensors
sts = small(f'{SEEDS}/**/*.safetensors') + small(f'{CASES}/**/*.safetensors')
for p in sts:
    out('checkpoint_file', os.path.basename(os.path.dirname(p)) + '_' + os.path.basename(p), open(p, 'rb').read())
for p in sorted(glob.glob(f'{HF}/*.safetensors')):
    out('checkpoint_file', 'hf_header_' + os.path.basename(p), header_only(p))
mixtral = st({'gate.weight': ('F32', [4, 8], f32(32)),
              'experts.gate_up_proj': ('BF16', [4, 6, 8], b'\x80\x3f' * 192),
              'experts.down_proj': ('F16', [4, 8, 3], b'\x00\x3c' * 96),
              'counts': ('I64', [2], struct.pack('<2q', 3, -1))}, {'format': 'pt'})
out('checkpoint_file', 'mixed_dtypes.safetensors', mixtral)

for p in small(f'{SEEDS}/**/*.safetensors') + small(f'{CASES}/fidelity/switch-input-batch/*.safetensors'):
    out('hidden_safetensors', os.path.basename(os.path.dirname(p)) + '_' + os.path.basename(p), open(p, 'rb').read())
out('hidden_safetensors', 'bsd_mask.safetensors', st({
    'hidden_states': ('F32', [2, 3, 4], f32(24)),
    'input_ids': ('I64', [2, 3], struct.pack('<6q', *range(6))),
    'attention_mask': ('BOOL', [2, 3], bytes([1, 1, 0, 1, 0, 0])),
    'seq_lens': ('I32', [2], struct.pack('<2i', 2, 1))}))
out('hidden_safetensors', 'td_padding.safetensors', st({
    'x': ('F64', [3, 2], struct.pack('<6d', 1, 2, 3, 4, 5, 6)),
    'padding_mask': ('U8', [3], bytes([0, 0, 1])),
    'token_ids': ('I32', [3], struct.pack('<3i', 1, 2, 3))}))

# --- checkpoint_sharded: index + shards
def index(weight_map):
    return json.dumps({'metadata': {'total_size': 0}, 'weight_map': weight_map}).encode()

s1 = st({'gate.weight': ('F32', [4, 8], f32(32))})
s2 = st({'experts.gate_up_proj': ('F32', [4, 6, 8], f32(192)), 'experts.down_proj': ('F32', [4, 8, 3], f32(96))})
names = ['model-00001-of-00004.safetensors', 'model-00002-of-00004.safetensors']
out('checkpoint_sharded', 'two_shards', SEP.join([index({'gate.weight': names[0], 'experts.gate_up_proj': names[1],
                                                          'experts.down_proj': names[1]}), s1, s2]))
out('checkpoint_sharded', 'prefixed', SEP.join([index({'model.layers.0.block_sparse_moe.gate.weight': names[0]}),
                                                st({'model.layers.0.block_sparse_moe.gate.weight': ('F32', [4, 8], f32(32))})]))
out('checkpoint_sharded', 'escape', SEP.join([index({'gate.weight': names[0], 'x': '../../../../etc/passwd'}), s1]))
out('checkpoint_sharded', 'missing_shard', SEP.join([index({'gate.weight': 'model-00003-of-00004.safetensors'}), s1]))
out('checkpoint_sharded', 'dup_key', SEP.join([b'{"weight_map": {"a": "' + names[0].encode() + b'", "a": "x"}}', s1]))
for p in small(f'{SEEDS}/**/model.safetensors.index.json'):
    m = json.load(open(p))
    shard_names = sorted(set(m.get('weight_map', {}).values()))
    files = [open(p, 'rb').read()]
    for n in shard_names:
        q = os.path.join(os.path.dirname(p), n)
        if os.path.isfile(q):
            files.append(open(q, 'rb').read())
    out('checkpoint_sharded', os.path.basename(os.path.dirname(p)), SEP.join(files))

# --- hidden_npy
for p in small(f'{SEEDS}/**/*.npy'):
    out('hidden_npy', os.path.basename(os.path.dirname(p)) + '_' + os.path.basename(p), open(p, 'rb').read())

def npy(descr, shape, raw, fortran=False, version=1):
    h = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, tuple(shape))
    pre = 10 if version == 1 else 12
    h = h + ' ' * (-(len(h) + 1 + pre) % 64) + '\n'
    hl = struct.pack('<H', len(h)) if version == 1 else struct.pack('<I', len(h))
    return b'\x93NUMPY' + bytes([version, 0]) + hl + h.encode() + raw

out('hidden_npy', 'f32_4x8.npy', npy('<f4', [4, 8], f32(32)))
out('hidden_npy', 'f64_2x3x4.npy', npy('<f8', [2, 3, 4], struct.pack('<24d', *range(24))))
out('hidden_npy', 'f16_fortran.npy', npy('<f2', [3, 2], b'\x00\x3c' * 6, fortran=True))
out('hidden_npy', 'bigendian_v2.npy', npy('>f4', [2, 2], struct.pack('>4f', 1, 2, 3, 4), version=2))

# --- config_json: the shared cases' configs and one per family built from the fixtures' routing
for p in small(f'{SEEDS}/**/config.json'):
    out('config_json', os.path.basename(os.path.dirname(p)) + '.json', open(p, 'rb').read())
for p in sorted(glob.glob(os.path.join(ROOT, 'moe-models', 'src', 'presets', '*.rs'))):
    src = open(p).read()
    types = re.findall(r'model_types: &\[([^\]]*)\]', src)
    if not types:
        continue
    cfg = {}
    for i, fields in enumerate(re.findall(r'ConfigField::new\(\s*&\[([^\]]*)\]', src)):
        for j, name in enumerate(re.findall(r'"([a-z_0-9]+)"', fields)):
            if j == 0:
                cfg[name] = [8, 2, True, 4, 2, 1.0, 0, 0.5][i % 8]
    for t in re.findall(r'"([a-z_0-9]+)"', types[0]):
        out('config_json', f'{t}.json', json.dumps(dict(cfg, model_type=t), indent=1))
out('config_json', 'wrong_types.json', '{"model_type": "mixtral", "num_local_experts": 4.0, "num_experts_per_tok": "2"}')
out('config_json', 'dup.json', '{"model_type": "mixtral", "model_type": "olmoe"}')

# --- fixture_manifest: manifest (first case, file renamed case.safetensors) + its case file
def manifest_seed(name, mpath):
    m = json.load(open(mpath))
    cases = m.get('cases', [])
    files = []
    if cases:
        c = dict(cases[0])
        q = os.path.join(os.path.dirname(mpath), c.get('file', ''))
        c['file'] = 'case.safetensors'
        c.pop('sha256', None)
        if os.path.isfile(q) and os.path.getsize(q) <= 16384:
            files.append(open(q, 'rb').read())
            c['bytes'] = os.path.getsize(q)
        else:
            c.pop('bytes', None)
        m['cases'] = [c]
    out('fixture_manifest', name, SEP.join([json.dumps(m).encode()] + files))

for p in sorted(glob.glob(f'{SEEDS}/**/manifest.json', recursive=True)) + \
        sorted(glob.glob(f'{CASES}/fidelity/**/manifest.json', recursive=True)):
    if os.path.isfile(p) and not os.path.islink(p):
        manifest_seed(os.path.basename(os.path.dirname(p)), p)
hf = json.load(open(os.path.join(HF, 'manifest.json')))
for c in hf['cases']:
    c = {k: c[k] for k in ('name', 'file', 'model_family', 'batch', 'seq_len', 'routing') if k in c}
    c['file'] = 'case.safetensors'
    out('fixture_manifest', 'hf_' + c['name'], json.dumps({'cases': [c]}))

# --- router_options
opts = ['all', 'softmax-topk', 'softmax-topk:k=2,renormalize=false', 'softmax-topk:preset=deepseek_v3,n_group=4,topk_group=2',
        'softmax-topk:score=sigmoid,scaling=2.5,correction_bias=true', 'softmax-topk:order=top_k_then_softmax,renormalize=false',
        'softmax-topk:lb_norm=megatron,aux_coefficient=0.1', 'noisy-topk:k=1,noise_epsilon=0.5,w_load=0.1',
        'switch-top1:capacity_factor=1.25,drop=probability,hash', 'switch-top1:capacity=fixed,expert_capacity=2,per_sequence=true',
        'switch-top1:capacity=deepspeed,min_capacity=1,jitter=0.1', 'switch-top1:capacity_factor=nan',
        'hash:table=balanced,counts=[5,1,3,0,2]', 'hash:table=modulo,k=3,weights=gate', 'hash:vocab=64',
        'expert-choice:capacity_factor=0.5', 'peer:heads=2,k=2,product_key_topk=3,d_key=4', 'peer:non_competing_scores=true,query_batchnorm=true,activation=silu',
        'softmax-topk:k="2"', 'softmax-topk:k', ':k=1', 'softmax-topk,noisy-topk,expert-choice,peer,hash,switch-top1']
for i, o in enumerate(opts):
    out('router_options', f'opt{i:02}', o)

# --- router_toml
for p in small(f'{SEEDS}/**/*.toml'):
    out('router_toml', os.path.basename(os.path.dirname(p)) + '_' + os.path.basename(p), open(p, 'rb').read())
tomls = ['[[router]]\nname = "softmax-topk"\nlabel = "top2"\noptions = { k = 2, renormalize = false }\n',
         '[[router]]\nname = "switch-top1"\n[router.options]\ncapacity = "fixed"\nexpert_capacity = 3\n\n[[router]]\nname = "hash"\noptions = { counts = [1, 2, 3], table = "balanced" }\n',
         '[[router]]\nname = "peer"\noptions = { heads = 2, k = 2, d_key = 4 }\n[[router]]\nname = "expert-choice"\noptions = { capacity_factor = 1e300 }\n',
         '[[router]]\nname = "noisy-topk"\noptions = { when = 1979-05-27T07:32:00Z, nested = { a = [1.5, -inf] } }\n',
         'router = []\n', '[[router]]\nname = "nope"\n']
for i, t in enumerate(tomls):
    out('router_toml', f'toml{i:02}.toml', t)
print('seeds written under fuzz/corpus/')
