#!/usr/bin/env bash
# Assembles each fuzz target's seed corpus under OUT/<target>/ from the repository's fixtures and models
# (small files only: libFuzzer mutates inputs up to the largest seed's size, and large seeds slow every run),
# plus a few inputs written here: a small safetensors file and its index, prompts, chat requests.
# Usage: fuzz/seeds.sh OUT
set -euo pipefail
out=${1:?usage: fuzz/seeds.sh OUT}
root=$(cd "$(dirname "$0")/.." && pwd)
fx=$root/tests/fixtures
rm -rf "$out"
mkdir -p "$out"
seed() {  # seed TARGET NAME: stdin to OUT/TARGET/NAME
  mkdir -p "$out/$1"
  cat >"$out/$1/$2"
}
u64le() {  # 8 little-endian bytes of $1
  local n=$1 i
  for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"; done
}
safetensors() {  # safetensors HEADER_JSON DATA_BYTES: the file on stdout (data bytes 0x3c, about 1.0 in f16)
  u64le ${#1}
  printf '%s' "$1"
  head -c "$2" /dev/zero | tr '\0' '<'
}

safetensors '{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"h":{"dtype":"F16","shape":[3],"data_offsets":[16,22]},"b":{"dtype":"BF16","shape":[1,1],"data_offsets":[22,24]},"i":{"dtype":"I64","shape":[1],"data_offsets":[24,32]}}' 32 | seed fuzz_safetensors mixed
safetensors '{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}' 4 | seed fuzz_safetensors scalar

# A pre-quantized file (blip2 quantize's names and metadata), int8 and int4 g32 (with one float column, whose
# index the filler bytes make 0x3c3c3c3c: out of range, so mutations must make it valid), and a float tensor.
safetensors '{"__metadata__":{"format":"pt","blip2.quantized_layout":"2"},"w.int8":{"dtype":"I8","shape":[2,32],"data_offsets":[0,64]},"v.int4_g32":{"dtype":"U8","shape":[1,32],"data_offsets":[64,96]},"w.int8_scales":{"dtype":"F32","shape":[2],"data_offsets":[96,104]},"v.int4_g32_scales":{"dtype":"F16","shape":[1,2],"data_offsets":[104,108]},"b":{"dtype":"F32","shape":[2],"data_offsets":[108,116]},"v.int4_g32_columns":{"dtype":"I32","shape":[1],"data_offsets":[116,120]},"v.int4_g32_column_weights":{"dtype":"F32","shape":[1,1],"data_offsets":[120,124]}}       ' 124 | seed fuzz_quantized_checkpoint int8_int4

printf '{"metadata":{"total_size":32},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}' | seed fuzz_checkpoint_index index
printf '{"weight_map":{"a":"model-00001-of-00002.safetensors"}}' | seed fuzz_checkpoint_index partial

for m in t5 opt; do seed fuzz_config "$m" <"$root/models/tiny-blip2-$m/config.json"; done
for m in instructblip-t5 instructblip-vicuna blip2-itm; do seed fuzz_config "$m" <"$fx/tiny-$m/config.json"; done

for f in images/one_pixel.png images/palette_color.png images/truncated.jpg webp/gray_lossy.webp webp/chelsea_lossy.webp \
         webp/logo_lossless_alpha.webp; do
  seed fuzz_image "$(basename "$f")" <"$fx/$f"
done
# A JPEG's headers (quantisation and Huffman tables, frame) and the first scan data.
head -c 6000 "$fx/images/rocket.jpg" | seed fuzz_image rocket_head.jpg

seed fuzz_t5_model spiece.model <"$root/models/tiny-blip2-t5/spiece.model"
opt=$root/models/tiny-blip2-opt
{ cat "$opt/vocab.json"; printf '\n#FUZZ-SPLIT#\n'; cat "$opt/merges.txt"; printf '\n#FUZZ-SPLIT#\n'
  cat "$opt/tokenizer_config.json"; } | seed fuzz_opt_files opt

for t in fuzz_t5_text fuzz_opt_text fuzz_llama_text fuzz_bert_text; do
  printf 'Question: what is in the picture? Answer:' | seed $t question
  printf "a photo of a cat, isn't it? you're right ... don't  '  spaces\t\ttabs" | seed $t cleanup
  printf 'a</s>b [SEP][MASK] [dec]\t[DEC]\nx' | seed $t llama_bert_specials
  printf '</s><pad><unk><extra_id_0> caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 \xff\xfe bad utf-8' | seed $t specials
done

png64=$(base64 -w0 "$fx/images/one_pixel.png")
seed fuzz_chat_request caption <<EOF2
{"model":"blip2","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,$png64"}}]}]}
EOF2
seed fuzz_chat_request conversation <<EOF2
{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,$png64"}},{"type":"text","text":"What is it?"}]},{"role":"assistant","content":"a cat"},{"role":"user","content":"What colour?"}],"max_tokens":12,"temperature":0.7,"top_p":0.9,"n":2,"stream":true,"stream_options":{"include_usage":true},"seed":7}
EOF2
seed fuzz_chat_request beams <<EOF2
{"messages":[{"role":"user","content":[{"type":"text","text":"Question: where? Answer:"},{"type":"image_url","image_url":{"url":"file:///etc/passwd"}}]}],"num_beams":3,"length_penalty":1.5,"repetition_penalty":1.2,"min_tokens":2,"early_stopping":"never","stop":["."]}
EOF2

base64 -w0 "$fx/images/one_pixel.png" | seed fuzz_base64 png
printf 'YQ==' | seed fuzz_base64 one

seed fuzz_tar 00000.tar <"$fx/webdataset/00000.tar"
