#!/usr/bin/env bash
# The README's first command (`make demo`): installs what is missing, builds dmx, builds a handful of real
# emoji with `dmx data emoji --only`, runs every feature on the bundled emoji models with the real CLI, and
# writes demo/index.html, a static gallery (relative image paths, inline CSS, no JavaScript, no network):
# one section per feature with inputs and outputs side by side, the exact prompts, command lines,
# parameters and the time of each step, and the metrics table of `dmx eval`.
#
# Environment (default in brackets):
#   DMX_MODEL        [models/emoji]                          diffusers folder (required)
#   DMX_CONTROLNET   [models/emoji-controlnet-canny]         Canny ControlNet
#   DMX_ADAPTER      [models/emoji-adapter-canny]            Canny T2I-Adapter
#   DMX_LORA         [models/emoji-lora-twitter.safetensors] Google -> Twitter style LoRA
#   DMX_HYPERNETWORK [models/emoji-hypernetwork-twitter.pt]  Google -> Twitter style A1111 hypernetwork
#   DMX_DREAMBOOTH   [models/emoji-dreambooth.safetensors]   DreamBooth LoRA of a held-out emoji
#   DMX_DREAMBOOTH_PROMPT [first line of ${DMX_DREAMBOOTH%.safetensors}.txt]  its instance prompt
#   DMX_CLASSIFIER   [models/emoji-classifier]               classifier of `dmx eval`
#   DMX_UPSCALER     [models/emoji-sr]                       StableDiffusionUpscalePipeline folder (dmx upscale,
#                                                            generate --upscale-model; e.g. stabilityai's x4 upscaler)
#   DMX_PALETTE      [models/emoji-palette-inpaint]          Palette folder (dmx train palette; dmx restore)
#   DMX_CLIP         [models/emoji-clip]                     CLIP folder (dmx train clip; dmx embed)
#   DMX_UNCLIP       [models/emoji-unclip]                   StableUnCLIPPipeline folder (dmx train prior + unclip)
#   DMX_UNCLIP_IMG2IMG [models/emoji-unclip-img2img]         StableUnCLIPImg2ImgPipeline folder (dmx variations)
#   DMX_SPATEXT      [models/emoji-spatext]                  SpaText folder (dmx train spatext; --layout-method spatext)
#   DMX_SCENE        [models/emoji-scene]                    scene folder (dmx train scene; --layout-method scene)
#   DMX_EVAL_ARGS    [--model $DMX_MODEL --classifier $DMX_CLASSIFIER --data $DMX_EMOJI_DATA --limit $DMX_DEMO_EVAL_LIMIT
#                     --steps N --seed N --out $DMX_DEMO_OUT/eval]  arguments of `dmx eval` (+ --json); DMX_DEMO_EVAL_LIMIT [32] prompts
#   DMX_EMOJI_DATA   [~/.cache/dmx/emoji-data]  the real emoji `dmx eval` compares against (built there when missing)
#   DMX_DEMO_OUT [demo]  DMX_DEMO_STEPS [20]  DMX_DEMO_SEED [42]  DMX_DEMO_GUIDANCE [3] (not for P2P, null-text)
#   DMX_DEMO_SIZE [the model's native size: unet sample_size x VAE factor]  side of the real inputs and outputs
#   DMX_DEMO_SKIP_SETUP=1  use the existing build (no setup.sh, no build.sh)
#   DMX_BUILD_DIR [build]  DMX_BIN [$DMX_BUILD_DIR/dmx]
# `scripts/demo.sh --serve [OPTIONS]` installs and builds the same way, then runs `dmx serve --models models OPTIONS`
# (the web page and the A1111-compatible API on the bundled emoji models) instead of the gallery.
# A section whose optional model (ControlNet, LoRA, DreamBooth, upscaler, Palette, classifier) is missing is skipped with a
# visible note in the page and on stderr; a missing DMX_MODEL is an error (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
T_START=${EPOCHREALTIME//[.,]/}

MODEL="${DMX_MODEL:-models/emoji}"
CONTROLNET="${DMX_CONTROLNET:-models/emoji-controlnet-canny}"
ADAPTER="${DMX_ADAPTER:-models/emoji-adapter-canny}"
LORA="${DMX_LORA:-models/emoji-lora-twitter.safetensors}"
HYPERNET="${DMX_HYPERNETWORK:-models/emoji-hypernetwork-twitter.pt}"
DREAMBOOTH="${DMX_DREAMBOOTH:-models/emoji-dreambooth.safetensors}"
DREAMBOOTH_TXT="${DREAMBOOTH%.safetensors}.txt"
CLASSIFIER="${DMX_CLASSIFIER:-models/emoji-classifier}"
UPSCALER="${DMX_UPSCALER:-models/emoji-sr}"
PALETTE="${DMX_PALETTE:-models/emoji-palette-inpaint}"
CLIP="${DMX_CLIP:-models/emoji-clip}"
UNCLIP="${DMX_UNCLIP:-models/emoji-unclip}"
UNCLIP_I2I="${DMX_UNCLIP_IMG2IMG:-models/emoji-unclip-img2img}"
SPATEXT="${DMX_SPATEXT:-models/emoji-spatext}"
SCENE="${DMX_SCENE:-models/emoji-scene}"
OUT="${DMX_DEMO_OUT:-demo}"
STEPS="${DMX_DEMO_STEPS:-20}"
SEED="${DMX_DEMO_SEED:-42}"
BUILD_DIR="${DMX_BUILD_DIR:-build}"
DMX="${DMX_BIN:-$BUILD_DIR/dmx}"
# The real emoji the demo edits (emoji.json short names).
EMOJI="grinning,pizza,cat,apple,smiley,sunglasses"

if [ ! -f "$MODEL/model_index.json" ]; then
  echo "demo: no diffusers model at '$MODEL' (model_index.json missing)." >&2
  echo "demo: the bundled emoji model family lives in models/ (models/emoji, models/emoji-controlnet-canny," >&2
  echo "demo: models/emoji-lora-twitter.safetensors, ...); check out a revision that has it, or set" >&2
  echo "demo: DMX_MODEL=/path/to/diffusers-folder (and DMX_CONTROLNET, DMX_LORA, DMX_DREAMBOOTH)." >&2
  exit 2
fi

# The model's native image side: UNet sample_size x 2^(VAE levels - 1), read with coreutils only.
json_compact() { tr -d ' \n\t\r' <"$1"; }
native_size() {
  local s levels
  s=$(json_compact "$MODEL/unet/config.json" | grep -o '"sample_size":[0-9]*' | head -n 1 | cut -d: -f2)
  levels=$(json_compact "$MODEL/vae/config.json" | grep -o '"block_out_channels":\[[0-9,]*\]' | head -n 1 | tr -cd ',' | wc -c)
  if [ -n "$s" ] && [ -n "$levels" ]; then echo $((s << levels)); else echo 64; fi
}
SIZE="${DMX_DEMO_SIZE:-$(native_size)}"

# ---- 1. install what is missing, build ----------------------------------------------------------------
if [ "${DMX_DEMO_SKIP_SETUP:-0}" != 1 ]; then
  t0=${EPOCHREALTIME//[.,]/}
  scripts/setup.sh --emoji
  t1=${EPOCHREALTIME//[.,]/}
  DMX_BUILD_DIR="$BUILD_DIR" scripts/build.sh dmx_cli
  t2=${EPOCHREALTIME//[.,]/}
  echo "demo: setup $(( (t1 - t0) / 1000000 )) s, build $(( (t2 - t1) / 1000000 )) s" >&2
fi
[ -x "$DMX" ] || { echo "demo: $DMX not found (build it with scripts/build.sh dmx_cli)" >&2; exit 2; }

# `scripts/demo.sh --serve [dmx serve options]`: the same install and build, then the server on the bundled emoji
# models instead of the gallery (the page at http://127.0.0.1:7860/; docs/serve.md). Ctrl-C stops it.
if [ "${1:-}" = "--serve" ]; then
  shift
  echo "demo: starting dmx serve on the bundled models (open the printed address; Ctrl-C stops it)" >&2
  exec "$DMX" serve --models models "$@"
fi

SECTIONS=(inputs txt2img img2img controlnet adapter layout spatext scene lora blended diffedit p2p nulltext dreambooth upscale palette clip unclip eval logs)
rm -f "${OUT:?}/index.html"  # no page pointing at the images removed next
for s in "${SECTIONS[@]}"; do rm -rf "${OUT:?}/$s"; done
mkdir -p "$OUT"
for s in "${SECTIONS[@]}"; do mkdir -p "$OUT/$s"; done
T_RUN=${EPOCHREALTIME//[.,]/}

# ---- helpers ------------------------------------------------------------------------------------------
esc() {  # HTML-escape $1
  local s=$1 amp='&amp;' lt='&lt;' gt='&gt;' quot='&quot;'
  s=${s//&/"$amp"}
  s=${s//</"$lt"}
  s=${s//>/"$gt"}
  s=${s//\"/"$quot"}
  printf '%s' "$s"
}
cmdline() {  # the arguments as one shell line (quoted where needed)
  local out="" a q="'" qq="'\\''"
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$a "; else out+="'${a//$q/$qq}' "; fi
  done
  printf '%s' "${out% }"
}
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }  # ms -> "12.3"

declare -A STEP_MS STEP_CPU_MS STEP_CMD
STEP_ORDER=()
SECTION_MS=()
CPU_TOTAL_MS=0
run() {  # run ID CMD... : runs CMD (output to $OUT/logs/ID.log), records its command line, wall and CPU time
  local id=$1 rc=0 real user sys
  shift
  printf 'demo: %-26s' "$id" >&2
  local TIMEFORMAT='%3R %3U %3S'
  { time "$@" >"$OUT/logs/$id.log" 2>&1; } 2>"$OUT/logs/$id.time" || rc=$?
  if [ "$rc" != 0 ]; then
    echo " FAILED (exit $rc); the command was:" >&2
    echo "  $(cmdline "$@")" >&2
    tail -n 20 "$OUT/logs/$id.log" | sed 's/^/  | /' >&2
    [ "${RUN_SOFT:-0}" = 1 ] && return 1
    exit 1
  fi
  read -r real user sys <"$OUT/logs/$id.time"
  STEP_MS[$id]=$(ms_of "$real")
  STEP_CPU_MS[$id]=$(( $(ms_of "$user") + $(ms_of "$sys") ))
  STEP_CMD[$id]=$(cmdline "$@")
  STEP_ORDER+=("$id")
  CPU_TOTAL_MS=$((CPU_TOTAL_MS + ${STEP_CPU_MS[$id]}))
  echo " $(secs "${STEP_MS[$id]}") s (CPU $(secs "${STEP_CPU_MS[$id]}") s)" >&2
}
ms_of() { local s=${1/,/.}; echo $(( 10#${s%.*} * 1000 + 10#${s#*.} )); }  # "12.345" -> 12345

png_size() {  # "W H" of a PNG (from its IHDR chunk)
  local b
  read -r -a b < <(od -An -tu1 -j16 -N8 "$1")
  echo $(( (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3] )) $(( (b[4] << 24) | (b[5] << 16) | (b[6] << 8) | b[7] ))
}
fig() {  # fig PATH CAPTION [SCALE]: a figure; PATH relative to $OUT; small images are enlarged (pixelated)
  local path=$1 cap=$2 scale=${3:-0} w h
  read -r w h < <(png_size "$OUT/$path")
  if [ "$scale" = 0 ]; then scale=1; [ "$h" -le 128 ] && scale=3; [ "$h" -le 32 ] && scale=6; fi
  local alt
  alt=$(printf '%s' "$cap" | sed 's/<[^>]*>//g; s/"/\&quot;/g')
  printf '<figure><img src="%s" width="%d" height="%d" alt="%s"><figcaption>%s</figcaption></figure>\n' \
    "$(esc "$path")" $((w * scale)) $((h * scale)) "$alt" "$cap"
}
row() {  # row LABEL FIGURES-HTML
  printf '<div class="row"><div class="label">%s</div><div class="figs">%s</div></div>\n' "$1" "$2"
}
runs_table() {  # runs_table ID[=PARAMS]... : prompt/parameters, command line and time of each step
  local item id params
  printf '<table class="runs"><tr><th>step</th><th>parameters</th><th>command line</th><th>wall (CPU) time</th></tr>\n'
  for item in "$@"; do
    id=${item%%=*}
    params=""
    [ "$item" != "$id" ] && params=${item#*=}
    printf '<tr><td>%s</td><td>%s</td><td><code>%s</code></td><td class="num">%s&nbsp;s (%s&nbsp;s)</td></tr>\n' \
      "$(esc "$id")" "$params" "$(esc "${STEP_CMD[$id]}")" "$(secs "${STEP_MS[$id]}")" "$(secs "${STEP_CPU_MS[$id]}")"
  done
  printf '</table>\n'
}
q() { printf '<q>%s</q>' "$(esc "$1")"; }  # a prompt, quoted
SECTIONS_HTML=""
TOC=""
section() {  # section ID TITLE INTRO BODY-HTML MS
  TOC+="<li><a href=\"#$1\">$2</a> <span class=\"t\">$(secs "$5")&nbsp;s</span></li>"
  SECTIONS_HTML+="<section id=\"$1\"><h2>$2 <span class=\"t\">$(secs "$5")&nbsp;s</span></h2><p>$3</p>
$4</section>
"
  SECTION_MS+=("$2=$5=$((CPU_TOTAL_MS - SEC_CPU0))")
}
skipped() {  # skipped ID TITLE WHY
  echo "demo: skipping $2: $3" >&2
  TOC+="<li><a href=\"#$1\">$2</a> <span class=\"t\">skipped</span></li>"
  SECTIONS_HTML+="<section id=\"$1\"><h2>$2</h2><p class=\"skip\">Skipped: $(esc "$3")</p></section>
"
  SKIPPED+=("$2")
}
SKIPPED=()
sec_t0() { SEC_T0=${EPOCHREALTIME//[.,]/}; SEC_CPU0=$CPU_TOTAL_MS; }
sec_ms() { echo $(( (${EPOCHREALTIME//[.,]/} - SEC_T0) / 1000 )); }
have_file() { [ -e "$1" ]; }

# Per-image measurements of `dmx eval` (when this build has it), else nothing.
HAVE_EVAL=0
"$DMX" eval --help >/dev/null 2>&1 && HAVE_EVAL=1
file_metric() {  # dmx eval prints "name value": the value of its last line
  [ "$HAVE_EVAL" = 1 ] || return 0
  local v
  v=$("$DMX" eval "$@" 2>/dev/null | tail -n 1 || true)
  v=${v##*[[:space:]]}
  [[ $v =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] && printf '%s' "$v"
  return 0
}
with_metric() {  # with_metric LABEL VALUE -> "<br>LABEL VALUE" or nothing
  [ -n "$2" ] && printf '<br>%s %s' "$1" "$2"
  return 0
}

# Guidance 3 (not SD's 7.5) for the emoji model's own generations: at 7.5 it over-saturates and loses identity
# (docs/evaluation.md measures it); Prompt-to-Prompt and null-text inversion keep 7.5, as their papers do.
GUIDANCE=${DMX_DEMO_GUIDANCE:-3}
GEN=("$DMX" generate --model "$MODEL" --steps "$STEPS" --seed "$SEED" --guidance-scale "$GUIDANCE" --quiet)
SIZE_ARGS=(--width "$SIZE" --height "$SIZE")
COMMON_PARAMS="steps $STEPS, seed $SEED, guidance $GUIDANCE, scheduler: the model's"

# ---- 2. real inputs: a handful of emoji built from the npm packages ----------------------------------
sec_t0
run data_emoji "$DMX" data emoji --only "$EMOJI" --style google --style twitter --size "$SIZE" \
  --out "$OUT/inputs/emoji" --overwrite --quiet
emoji() {  # emoji STYLE KIND SHORT -> path relative to $OUT of images|edges|masks/SHORT.png
  local split
  for split in train heldout; do
    if [ -f "$OUT/inputs/emoji/$1/$split/$2/$3.png" ]; then
      echo "inputs/emoji/$1/$split/$2/$3.png"
      return
    fi
  done
  echo "demo: $1 emoji '$3' missing from $OUT/inputs/emoji" >&2
  exit 1
}
figs=""
for e in ${EMOJI//,/ }; do figs+=$(fig "$(emoji google images "$e")" "$e (google)"); done
body=$(row "Google" "$figs")
figs=""
for e in ${EMOJI//,/ }; do figs+=$(fig "$(emoji twitter images "$e")" "$e (twitter)"); done
body+=$(row "Twitter" "$figs")
figs=""
for e in ${EMOJI//,/ }; do figs+=$(fig "$(emoji google edges "$e")" "edges"); figs+=$(fig "$(emoji google masks "$e")" "mask"); done
body+=$(row "Canny edges, alpha masks" "$figs")
body+=$(runs_table "data_emoji=emoji.json short names $EMOJI, both styles, ${SIZE}&times;${SIZE}")
section inputs "Real inputs: <code>dmx data emoji --only</code>" \
  "A few real emoji from the npm packages emoji-datasource-google (Apache-2.0) and emoji-datasource-twitter (CC-BY 4.0), built exactly like the training set (${SIZE}&times;${SIZE} RGB on white, Canny edges, alpha masks); the edits below start from these." \
  "$body" "$(sec_ms)"

# ---- 3. text to image ----------------------------------------------------------------------------------
sec_t0
PROMPTS=("grinning face" "slice of pizza" "cat face" "red apple" "rocket" "ghost" "smiling face with sunglasses"
         "slice of pizza, food & drink, google style")
figs=""
ids=()
i=0
for p in "${PROMPTS[@]}"; do
  run "txt2img_$i" "${GEN[@]}" "${SIZE_ARGS[@]}" --prompt "$p" --output "$OUT/txt2img/$i.png"
  figs+=$(fig "txt2img/$i.png" "$(q "$p")")
  ids+=("txt2img_$i=$(q "$p"); $COMMON_PARAMS")
  i=$((i + 1))
done
body=$(row "outputs" "$figs")
body+=$(runs_table "${ids[@]}")
section txt2img "Text to image" \
  "The bundled model <code>$(esc "$MODEL")</code>: prompts are lower-case emoji names, optionally followed by <q>, category, google style</q>. Same seed for every prompt." \
  "$body" "$(sec_ms)"

# ---- 4. image to image ---------------------------------------------------------------------------------
sec_t0
init=$(emoji google images grinning)
p="smiling face with sunglasses"
figs=""
ids=()
for s in 0.5 0.75; do
  run "img2img_$s" "${GEN[@]}" --init-image "$OUT/$init" --strength "$s" --prompt "$p" --output "$OUT/img2img/$s.png"
  figs+=$(fig "img2img/$s.png" "strength $s")
  ids+=("img2img_$s=$(q "$p"); strength $s; $COMMON_PARAMS")
done
body=$(row "input" "$(fig "$init" "real: grinning face")")
body+=$(row "$(q "$p")" "$figs")
body+=$(runs_table "${ids[@]}")
section img2img "Image to image" \
  "A real emoji, noised to <code>strength</code> of the schedule and denoised under a new prompt (SDEdit, diffusers' img2img pipeline)." \
  "$body" "$(sec_ms)"

# ---- 5. ControlNet -------------------------------------------------------------------------------------
if [ -e "$CONTROLNET" ]; then
  sec_t0
  src=$(emoji google images cat)
  edges=$(emoji google edges cat)
  figs=""
  ids=()
  i=0
  for p in "" "grinning face" "red apple"; do
    save=()  # the control map is the same for every prompt: saved once (dmx never overwrites without --overwrite)
    [ "$i" = 0 ] && save=(--save-control-image "$OUT/controlnet/control.png")
    run "controlnet_$i" "${GEN[@]}" "${SIZE_ARGS[@]}" --controlnet "$CONTROLNET" --control-image "$OUT/$edges" \
      "${save[@]}" --prompt "$p" --output "$OUT/controlnet/$i.png"
    f1=$(file_metric --edge-f1 "$OUT/controlnet/$i.png" --reference "$OUT/$edges")
    figs+=$(fig "controlnet/$i.png" "$(q "$p")$(with_metric "edge F1" "$f1")")
    ids+=("controlnet_$i=$(q "$p"); control scale 1.0; $COMMON_PARAMS")
    i=$((i + 1))
  done
  run controlnet_without "${GEN[@]}" "${SIZE_ARGS[@]}" --prompt "" --output "$OUT/controlnet/without.png"
  f1=$(file_metric --edge-f1 "$OUT/controlnet/without.png" --reference "$OUT/$edges")
  ids+=("controlnet_without=$(q ""); no ControlNet; $COMMON_PARAMS")
  body=$(row "input" "$(fig "$src" "real: cat face")$(fig "$edges" "its Canny edges")$(fig controlnet/control.png "control map as fed (--save-control-image)")")
  body+=$(row "with the ControlNet" "$figs")
  body+=$(row "without" "$(fig controlnet/without.png "$(q "")$(with_metric "edge F1" "$f1")")")
  body+=$(runs_table "${ids[@]}")
  section controlnet "ControlNet (Canny edges)" \
    "<code>$(esc "$CONTROLNET")</code> conditions the model on the Canny edges of a real emoji. With an empty prompt the edge map alone gives the picture its shape (compare the same seed without the ControlNet). With an emoji's name as the prompt, this small model draws that emoji and the map loses: each caption of its training set has exactly one image, so the caption alone fixes the shape (models/MODEL_CARD.md measures both). Edge F1 (when shown): <code>dmx eval --edge-f1 OUTPUT --reference EDGES</code>, Canny edges of the output against the control edges, exact pixels at this size." \
    "$body" "$(sec_ms)"
else
  skipped controlnet "ControlNet (Canny edges)" "no ControlNet at $CONTROLNET (set DMX_CONTROLNET)"
fi

# ---- 5b. T2I-Adapter -----------------------------------------------------------------------------------
if [ -e "$ADAPTER" ]; then
  sec_t0
  edges=$(emoji google edges cat)
  figs=""
  ids=()
  i=0
  for p in "" "grinning face"; do
    run "adapter_$i" "${GEN[@]}" "${SIZE_ARGS[@]}" --adapter "$ADAPTER" --adapter-image "$OUT/$edges" \
      --prompt "$p" --output "$OUT/adapter/$i.png"
    f1=$(file_metric --edge-f1 "$OUT/adapter/$i.png" --reference "$OUT/$edges")
    figs+=$(fig "adapter/$i.png" "$(q "$p")$(with_metric "edge F1" "$f1")")
    ids+=("adapter_$i=$(q "$p"); adapter scale 1.0; $COMMON_PARAMS")
    i=$((i + 1))
  done
  body=$(row "input" "$(fig "$edges" "Canny edges of the real cat face")")
  body+=$(row "with the T2I-Adapter" "$figs")
  body+=$(runs_table "${ids[@]}")
  section adapter "T2I-Adapter (Canny edges)" \
    "<code>$(esc "$ADAPTER")</code>, a T2I-Adapter trained by <code>dmx train adapter</code> (cubic timestep sampling, base frozen), runs once on the edge map and adds its features inside the UNet's down blocks at every step: a fraction of the ControlNet's size and cost (docs/t2i-adapter.md compares the two). Same edge map and seed as the ControlNet section." \
    "$body" "$(sec_ms)"
else
  skipped adapter "T2I-Adapter (Canny edges)" "no adapter at $ADAPTER (set DMX_ADAPTER)"
fi

# ---- 5c. regional prompts: a drawn layout -------------------------------------------------------------
sec_t0
# The layout map: a 64 x 32 PNG, left half #ff0000, right half #00ff00 (132 bytes, inline).
base64 -d >"$OUT/layout/map.png" <<'MAP'
iVBORw0KGgoAAAANSUhEUgAAAEAAAAAgCAIAAAAt/+nTAAAAS0lEQVR4nO2PwQkAMAyEsv/S7RSJCILvO503s8ru+gG8QQFyeIMC5PAGBcjhDQqQwxsUIIc3KEAOb1CAHN6gADm8QQFyeIMC5GwffDaH+GqBCqzvAAAAAElFTkSuQmCC
MAP
figs=""
ids=()
for s in 0 1; do
  run "layout_$s" "${GEN[@]}" --width 64 --height 32 --prompt "" --layout "$OUT/layout/map.png" \
    --region "#ff0000=red apple" --region "#00ff00=rocket" --layout-guidance-scale "$s" --output "$OUT/layout/$s.png"
  figs+=$(fig "layout/$s.png" "layout guidance scale $s$([ "$s" = 0 ] && echo " (text only)")")
  ids+=("layout_$s=regions red apple | rocket; layout guidance $s; $COMMON_PARAMS")
done
body=$(row "input" "$(fig layout/map.png "the layout: #ff0000 = red apple, #00ff00 = rocket")")
body+=$(row "outputs" "$figs")
body+=$(runs_table "${ids[@]}")
section layout "Regional prompts (a drawn layout)" \
  "<code>--layout MAP.png --region COLOR=TEXT</code>: DenseDiffusion's training-free attention modulation, for any model. On this small emoji model it barely changes the picture (it never draws two emoji side by side); docs/regional.md measures it per region." \
  "$body" "$(sec_ms)"

# ---- 5d. SpaText: a trained layout model ----------------------------------------------------------------
if [ -f "$SPATEXT/spatext.json" ]; then
  sec_t0
  # The layout: 64 x 64, #e6194b top left, #3cb44b bottom right, black background (174 bytes, inline).
  base64 -d >"$OUT/layout/spatext-map.png" <<'MAP'
iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAdUlEQVR42u3YsQ2AIBBAUTQuobOwAY4rGziLrmGLPRejvt9RkZcjFJeSJD3Z0B6OuXS/YDlrKGB8+wQAAAAAAAAAAAAAAAAAAP4KmKIvyFv/Tce+Vk8IAOCTv1DEHjOnYgIAAAAAAAAAAAAAAAAAAAAAkqR7F+UOCKk1yl4oAAAAAElFTkSuQmCC
MAP
  ST=("$DMX" generate --model "$SPATEXT" --steps "$STEPS" --seed "$SEED" --guidance-scale "$GUIDANCE" --quiet
      --prompt "red apple and rocket" --layout "$OUT/layout/spatext-map.png" --region "#e6194b=red apple"
      --region "#3cb44b=rocket")
  figs=""
  ids=()
  for m in spatext:1 spatext:0 regional:1; do
    meth=${m%%:*} s=${m##*:}
    run "spatext_${meth}_$s" "${ST[@]}" --layout-method "$meth" --layout-guidance-scale "$s" \
      --output "$OUT/layout/spatext-${meth}-$s.png"
    case $m in
      spatext:1) cap="SpaText (map guidance 1)" ;;
      spatext:0) cap="same model, text only (map guidance 0)" ;;
      *) cap="same model, regional prompts (training-free)" ;;
    esac
    figs+=$(fig "layout/spatext-${meth}-$s.png" "$cap")
    ids+=("spatext_${meth}_$s=\"red apple and rocket\"; regions red apple | rocket; --layout-method $meth, layout guidance $s; $COMMON_PARAMS")
  done
  body=$(row "input" "$(fig layout/spatext-map.png "the layout: #e6194b = red apple, #3cb44b = rocket")")
  body+=$(row "outputs" "$figs")
  body+=$(runs_table "${ids[@]}")
  section spatext "SpaText (a layout model trained by dmx)" \
    "<code>$(esc "$SPATEXT")</code>, trained by <code>dmx train spatext</code> on emoji scenes at 64 px: each region's text goes through the prior to a CLIP image embedding, painted into the region and fed to the UNet as extra channels, with the paper's multi-conditional guidance. Beside it, the same model without the map and with training-free regional prompts; docs/spatext.md measures all three on held-out layouts." \
    "$body" "$(sec_ms)"
else
  skipped spatext "SpaText (a layout model trained by dmx)" "no SpaText folder at $SPATEXT (set DMX_SPATEXT; docs/spatext.md makes one)"
fi

# ---- 5e. Make-A-Scene as diffusion: a trained scene model ---------------------------------------------------
if [ -f "$SCENE/scene.json" ]; then
  sec_t0
  [ -f "$OUT/layout/spatext-map.png" ] || base64 -d >"$OUT/layout/spatext-map.png" <<'MAP'
iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAdUlEQVR42u3YsQ2AIBBAUTQuobOwAY4rGziLrmGLPRejvt9RkZcjFJeSJD3Z0B6OuXS/YDlrKGB8+wQAAAAAAAAAAAAAAAAAAP4KmKIvyFv/Tce+Vk8IAOCTv1DEHjOnYgIAAAAAAAAAAAAAAAAAAAAAkqR7F+UOCKk1yl4oAAAAAElFTkSuQmCC
MAP
  SC=("$DMX" generate --model "$SCENE" --steps "$STEPS" --seed "$SEED" --guidance-scale "$GUIDANCE" --quiet
      --prompt "red apple and rocket" --layout "$OUT/layout/spatext-map.png" --region "#e6194b=Food & Drink"
      --region "#3cb44b=Travel & Places" --layout-method scene)
  figs=""
  ids=()
  for m in text:1 all:1 text:0; do
    g=${m%%:*} s=${m##*:}
    run "scene_${g}_$s" "${SC[@]}" --scene-guidance "$g" --layout-guidance-scale "$s" \
      --output "$OUT/layout/scene-${g}-$s.png"
    case $m in
      text:1) cap="scene tokens, guidance drops the text (Make-A-Scene's)" ;;
      all:1) cap="scene tokens, guidance drops text and scene" ;;
      *) cap="same model, text only (no scene)" ;;
    esac
    figs+=$(fig "layout/scene-${g}-$s.png" "$cap")
    ids+=("scene_${g}_$s=\"red apple and rocket\"; regions Food & Drink | Travel & Places; --scene-guidance $g, layout scale $s; $COMMON_PARAMS")
  done
  body=$(row "input" "$(fig layout/spatext-map.png "the layout: #e6194b = Food &amp; Drink, #3cb44b = Travel &amp; Places")")
  body+=$(row "outputs" "$figs")
  body+=$(runs_table "${ids[@]}")
  section scene "Make-A-Scene as diffusion (a scene model trained by dmx)" \
    "<code>$(esc "$SCENE")</code>, trained by <code>dmx train vqseg</code> and <code>dmx train scene</code> on emoji scenes at 64 px: each region carries a category, VQ-SEG turns the category map and its edges into 8 x 8 scene tokens, appended to the text in every cross-attention, where each picture cell reads its own cells' tokens in a softmax of their own. Make-A-Scene is autoregressive; this is its diffusion counterpart: on held-out layouts its region IoU is 0.58-0.66 against 0.15 from the text alone (docs/scene.md)." \
    "$body" "$(sec_ms)"
else
  skipped scene "Make-A-Scene as diffusion (a scene model trained by dmx)" "no scene folder at $SCENE (set DMX_SCENE; docs/scene.md makes one)"
fi

# ---- 6. LoRA -------------------------------------------------------------------------------------------
if [ -f "$LORA" ]; then
  sec_t0
  body=$(row "real references" "$(fig "$(emoji google images grinning)" "google")$(fig "$(emoji twitter images grinning)" "twitter")$(fig "$(emoji google images apple)" "google")$(fig "$(emoji twitter images apple)" "twitter")")
  ids=()
  withs=(0 1)
  [ -f "$HYPERNET" ] && withs+=(2)  # the Twitter-style A1111 hypernetwork (dmx train hypernetwork)
  for with in "${withs[@]}"; do
    figs=""
    i=0
    for p in "grinning face" "red apple"; do
      extra=()
      [ "$with" = 1 ] && extra=(--lora "$LORA")
      [ "$with" = 2 ] && extra=(--hypernetwork "$HYPERNET")
      run "lora_${with}_$i" "${GEN[@]}" "${SIZE_ARGS[@]}" "${extra[@]}" --prompt "$p" --output "$OUT/lora/${with}_$i.png"
      figs+=$(fig "lora/${with}_$i.png" "$(q "$p")")
      what=("no LoRA" "LoRA scale 1.0" "hypernetwork $(basename "$HYPERNET") at 1.0")
      ids+=("lora_${with}_$i=$(q "$p"); ${what[$with]}; $COMMON_PARAMS")
      i=$((i + 1))
    done
    labels=("without LoRA" "with the Twitter LoRA" "with the Twitter hypernetwork (A1111 .pt)")
    body+=$(row "${labels[$with]}" "$figs")
  done
  body+=$(runs_table "${ids[@]}")
  section lora "LoRA: Google style to Twitter style" \
    "The same prompts and seed without and with <code>--lora $(esc "$LORA")</code>$([ -f "$HYPERNET" ] && echo ", and with <code>--hypernetwork $(esc "$HYPERNET")</code> (an A1111 hypernetwork dmx trained)")." "$body" "$(sec_ms)"
else
  skipped lora "LoRA: Google style to Twitter style" "no LoRA at $LORA (set DMX_LORA)"
fi

# ---- 7. blended latent diffusion -----------------------------------------------------------------------
sec_t0
init=$(emoji google images grinning)
mask=$(emoji google masks grinning)
p="cat face"
figs=""
ids=()
for bg in latent pixel poisson optimize-latents finetune-decoder; do
  run "blended_$bg" "${GEN[@]}" --init-image "$OUT/$init" --mask "$OUT/$mask" --background "$bg" --prompt "$p" \
    --output "$OUT/blended/$bg.png"
  be=$(file_metric --background-error "$OUT/blended/$bg.png" --reference "$OUT/$init" --mask "$OUT/$mask")
  figs+=$(fig "blended/$bg.png" "--background $bg$(with_metric "background error" "$be")")
  ids+=("blended_$bg=$(q "$p"); strength 1.0; background $bg; $COMMON_PARAMS")
done
body=$(row "inputs" "$(fig "$init" "real: grinning face")$(fig "$mask" "mask (white = edit)")")
body+=$(row "$(q "$p")" "$figs")
body+=$(runs_table "${ids[@]}")
section blended "Blended edit (Blended Latent Diffusion)" \
  "<code>dmx generate --init-image --mask</code>: only the masked region follows the prompt; one output per <code>--background</code> reconstruction (latent blending only, pixel stitching, Poisson blending, optimised latents, a decoder fine-tuned for this image). Background error (when shown): <code>dmx eval --background-error OUTPUT --reference INPUT --mask MASK</code>, the mean absolute change outside the mask, in [0, 1]." \
  "$body" "$(sec_ms)"

# ---- 8. DiffEdit ---------------------------------------------------------------------------------------
sec_t0
body=""
ids=()
# A part edit (the eyes) and a whole-object edit (its mask is scored against the emoji's alpha mask).
for e in "grinning|grinning face|smiling face with sunglasses|sunglasses" "cat|cat face|dog face|dog"; do
  IFS='|' read -r short src_p dst_p id <<<"$e"
  img=$(emoji google images "$short")
  run "diffedit_$id" "$DMX" diffedit --model "$MODEL" --image "$OUT/$img" --source-prompt "$src_p" \
    --target-prompt "$dst_p" --steps "$STEPS" --seed "$SEED" --mask-output "$OUT/diffedit/mask-$id.png" \
    --output "$OUT/diffedit/edit-$id.png" --quiet
  iou=""
  [ "$id" = dog ] && iou=$(file_metric --mask-iou "$OUT/diffedit/mask-$id.png" --reference "$OUT/$(emoji google masks "$short")")
  body+=$(row "$(q "$src_p") &rarr; $(q "$dst_p")" "$(fig "$img" "real: $(esc "$src_p")")$(fig "diffedit/mask-$id.png" "estimated mask$(with_metric "IoU with the emoji's alpha mask" "$iou")")$(fig "diffedit/edit-$id.png" "$(q "$dst_p")")")
  ids+=("diffedit_$id=source $(q "$src_p"), target $(q "$dst_p"); encode ratio 0.8, 10 noise maps; steps $STEPS, seed $SEED, guidance 7.5")
done
body+=$(runs_table "${ids[@]}")
section diffedit "DiffEdit" \
  "<code>dmx diffedit</code> estimates where the source and target prompts disagree (the mask), DDIM-inverts the real image and regenerates only inside the mask. The sunglasses edit finds the eyes; the cat-to-dog edit smears the whole face, outside the mask too (a limit of this 8&times;8-latent model, in models/MODEL_CARD.md)." \
  "$body" "$(sec_ms)"

# ---- 9. Prompt-to-Prompt -------------------------------------------------------------------------------
sec_t0
P2P=("$DMX" p2p --model "$MODEL" "${SIZE_ARGS[@]}" --steps "$STEPS" --seed "$SEED" --quiet)
run p2p_replace "${P2P[@]}" --prompt "cat face" --edit-prompt "dog face" --mode replace \
  --save-attention-maps "$OUT/p2p/replace-maps.png" --output "$OUT/p2p/replace.png"
run p2p_reweight "${P2P[@]}" --prompt "smiling face with sunglasses" --edit-prompt "smiling face with sunglasses" \
  --mode reweight --reweight sunglasses=3 --save-attention-maps "$OUT/p2p/reweight-maps.png" \
  --output "$OUT/p2p/reweight.png"
body=$(row "replace" "$(fig p2p/replace-source.png "source: $(q "cat face")")$(fig p2p/replace-edit.png "edit: $(q "dog face")")")
body+=$(row "cross-attention maps" "$(fig p2p/replace-maps.png "per token, both prompts")")
body+=$(row "reweight" "$(fig p2p/reweight-source.png "source")$(fig p2p/reweight-edit.png "sunglasses &times; 3")")
body+=$(row "cross-attention maps" "$(fig p2p/reweight-maps.png "per token, both prompts")")
body+=$(runs_table "p2p_replace=$(q "cat face") &rarr; $(q "dog face"); cross/self replace 0.4/0.4; DDIM $STEPS steps, seed $SEED, guidance 7.5" \
  "p2p_reweight=$(q "smiling face with sunglasses"), attention to <q>sunglasses</q> &times; 3; DDIM $STEPS steps, seed $SEED, guidance 7.5")
section p2p "Prompt-to-Prompt" \
  "<code>dmx p2p</code> edits a generated image by editing the prompt while keeping the source's cross-attention maps: swap a word (replace) or scale one word's attention (reweight)." \
  "$body" "$(sec_ms)"

# ---- 10. null-text inversion: Prompt-to-Prompt on a real image -----------------------------------------
sec_t0
img=$(emoji google images apple)
NT_STEPS=$(( STEPS < 10 ? STEPS : 10 ))
run nulltext "$DMX" p2p --model "$MODEL" --image "$OUT/$img" --null-text-inversion --null-text-inner-steps 5 \
  --prompt "red apple" --edit-prompt "green apple" --steps "$NT_STEPS" --seed "$SEED" --quiet \
  --output "$OUT/nulltext/edit.png"
psnr=$(grep -o 'PSNR [0-9.]* dB' "$OUT/logs/nulltext.log" || true)
body=$(row "input" "$(fig "$img" "real: red apple")")
body+=$(row "outputs" "$(fig nulltext/edit-source.png "reconstruction ($(esc "${psnr:-PSNR n/a}"))")$(fig nulltext/edit-edit.png "edit: $(q "green apple")")")
body+=$(runs_table "nulltext=$(q "red apple") &rarr; $(q "green apple"); null-text inversion, 5 Adam steps per step; DDIM $NT_STEPS steps, guidance 7.5")
section nulltext "Null-text inversion: editing a real emoji" \
  "<code>dmx p2p --image --null-text-inversion</code> DDIM-inverts a real emoji and optimises the unconditional embedding per step (Mokady et al.) so that the source is reconstructed faithfully, then edits it with Prompt-to-Prompt." \
  "$body" "$(sec_ms)"

# ---- 11. DreamBooth ------------------------------------------------------------------------------------
if [ -f "$DREAMBOOTH" ] && { [ -n "${DMX_DREAMBOOTH_PROMPT:-}" ] || [ -f "$DREAMBOOTH_TXT" ]; }; then
  sec_t0
  IP="${DMX_DREAMBOOTH_PROMPT:-$(head -n 1 "$DREAMBOOTH_TXT")}"
  figs=""
  ids=()
  for s in "$SEED" $((SEED + 1)); do
    run "dreambooth_base_$s" "$DMX" generate --model "$MODEL" --steps "$STEPS" --seed "$s" --guidance-scale "$GUIDANCE" \
      --quiet "${SIZE_ARGS[@]}" --prompt "$IP" --output "$OUT/dreambooth/base_$s.png"
    run "dreambooth_$s" "$DMX" generate --model "$MODEL" --steps "$STEPS" --seed "$s" --guidance-scale "$GUIDANCE" \
      --quiet "${SIZE_ARGS[@]}" --lora "$DREAMBOOTH" --prompt "$IP" --output "$OUT/dreambooth/db_$s.png"
    figs+=$(fig "dreambooth/base_$s.png" "seed $s, no LoRA")$(fig "dreambooth/db_$s.png" "seed $s, DreamBooth LoRA")
    ids+=("dreambooth_base_$s=$(q "$IP"); no LoRA; steps $STEPS, seed $s, guidance $GUIDANCE" "dreambooth_$s=$(q "$IP"); DreamBooth LoRA; steps $STEPS, seed $s, guidance $GUIDANCE")
  done
  body=$(row "$(q "$IP")" "$figs")
  body+=$(runs_table "${ids[@]}")
  section dreambooth "DreamBooth" \
    "A LoRA trained by <code>dmx train dreambooth</code> on one emoji held out of the model's training set, prompted with its instance prompt (from <code>$(esc "$DREAMBOOTH_TXT")</code>), next to the base model with the same prompt and seed." \
    "$body" "$(sec_ms)"
else
  skipped dreambooth "DreamBooth" "no DreamBooth LoRA at $DREAMBOOTH with its instance prompt in $DREAMBOOTH_TXT (set DMX_DREAMBOOTH, DMX_DREAMBOOTH_PROMPT)"
fi

# ---- 11b. x4 super-resolution: dmx upscale and the cascade ----------------------------------------------
if grep -q '"StableDiffusionUpscalePipeline"' "$UPSCALER/model_index.json" 2>/dev/null; then
  sec_t0
  ids=()
  UP_PROMPT="${PROMPTS[0]}"
  run upscale_x4 "$DMX" upscale --model "$UPSCALER" --image "$OUT/txt2img/0.png" --prompt "$UP_PROMPT" \
    --steps "$STEPS" --seed "$SEED" --quiet --output "$OUT/upscale/x4.png"
  run upscale_cascade "${GEN[@]}" "${SIZE_ARGS[@]}" --prompt "$UP_PROMPT" --upscale-model "$UPSCALER" \
    --upscale-steps "$STEPS" --output "$OUT/upscale/cascade.png"
  figs=$(fig "txt2img/0.png" "input: $(q "$UP_PROMPT")" 4)$(fig "upscale/x4.png" "dmx upscale" 1)$(fig "upscale/cascade.png" "generate --upscale-model" 1)
  body=$(row "$(q "$UP_PROMPT")" "$figs")
  ids+=("upscale_x4=$(q "$UP_PROMPT"); noise level 20, guidance 9 (diffusers' defaults); steps $STEPS, seed $SEED")
  ids+=("upscale_cascade=$(q "$UP_PROMPT"); the base run above, then the upscaler on its picture with the same seed's generator; upscaler steps $STEPS")
  body+=$(runs_table "${ids[@]}")
  section upscale "Super-resolution: <code>dmx upscale</code> and the cascade" \
    "The x4 upscaler <code>$(esc "$UPSCALER")</code> (a StableDiffusionUpscalePipeline folder) on the first text-to-image output, and the same prompt as one cascaded command (docs/upscale.md)." \
    "$body" "$(sec_ms)"
else
  skipped upscale "Super-resolution: <code>dmx upscale</code>" "no StableDiffusionUpscalePipeline folder at $UPSCALER (set DMX_UPSCALER, e.g. to stabilityai/stable-diffusion-x4-upscaler)"
fi

# ---- 11c. Palette: dmx restore -------------------------------------------------------------------------
if [ -f "$PALETTE/palette.json" ]; then
  sec_t0
  ids=()
  P_TASK=$(json_compact "$PALETTE/palette.json" | grep -o '"task":"[a-z]*"' | head -n 1 | cut -d'"' -f4)
  P_RES=$(json_compact "$PALETTE/palette.json" | grep -o '"resolution":[0-9]*' | head -n 1 | cut -d: -f2)
  # The pictures at the model's training size (the model was trained on the Google style's training concepts).
  run palette_data "$DMX" data emoji --only "$EMOJI" --style google --size "$P_RES" --out "$OUT/palette/emoji" \
    --overwrite --quiet
  body=""
  for e in ${EMOJI//,/ } ; do
    src=""
    for split in train heldout; do
      [ -f "$OUT/palette/emoji/google/$split/images/$e.png" ] && src="palette/emoji/google/$split/images/$e.png"
    done
    [ -z "$src" ] && continue
    run "restore_$e" "$DMX" restore --model "$PALETTE" --image "$OUT/$src" --steps 100 --seed "$SEED" \
      --num-images 3 --save-input "$OUT/palette/${e}_input.png" --output "$OUT/palette/$e.png" --quiet
    figs=$(fig "$src" "original")$(fig "palette/${e}_input.png" "input ($P_TASK)")
    for i in 0 1 2; do figs+=$(fig "palette/$e-$i.png" "sample $i"); done
    body+=$(row "$e" "$figs")
    ids+=("restore_$e=task $P_TASK, default mask, 100 steps (the test schedule respaced), seed $SEED, 3 samples")
  done
  # The training command itself, for a few steps on these pictures (the model above took 1200 steps, docs/palette.md).
  run palette_train "$DMX" train palette --task colorize --data "$OUT/palette/emoji/google/train" --resolution "$P_RES" \
    --steps 3 --batch-size 4 --palette-channels 32 --output "$OUT/palette/train-demo" --overwrite --quiet
  ids+=("palette_train=a 3-step colorization run on the pictures above: $(esc "$(tail -n 1 "$OUT/logs/palette_train.log")")")
  body+=$(runs_table "${ids[@]}")
  section palette "Palette: <code>dmx train palette</code>, <code>dmx restore</code>" \
    "Palette (Saharia et al. 2022; docs/palette.md) with <code>$(esc "$PALETTE")</code>, a ${P_RES}&times;${P_RES} pixel-space model for the $P_TASK task made by <code>dmx train palette</code>: the original, the degraded input the model is conditioned on, and three samples of one seed's generator." \
    "$body" "$(sec_ms)"
else
  skipped palette "Palette: <code>dmx train palette</code>, <code>dmx restore</code>" "no Palette folder at $PALETTE (make one with dmx train palette, docs/palette.md; set DMX_PALETTE)"
fi

# ---- 11d. CLIP: dmx embed ------------------------------------------------------------------------------
if [ -f "$CLIP/model_index.json" ]; then
  sec_t0
  # The real Google emoji of section 2 against their emoji.json names, through dmx's own small CLIP.
  CLIP_NAMES=("grinning face" "slice of pizza" "cat face" "red apple" "smiling face with open mouth"
              "smiling face with sunglasses")
  args=()
  shorts=(${EMOJI//,/ })
  for e in "${shorts[@]}"; do args+=(--image "$OUT/$(emoji google images "$e")"); done
  for n in "${CLIP_NAMES[@]}"; do args+=(--prompt "$n"); done
  run clip "$DMX" embed --model "$CLIP" "${args[@]}"
  n=${#shorts[@]}
  # The matrix rows of `dmx embed` ("  [i]  v0 v1 ..."): images are rows 0..n-1, the names columns n..2n-1.
  head="<tr><th></th>"
  for nm in "${CLIP_NAMES[@]}"; do head+="<th>$(esc "$nm")</th>"; done
  rows=""
  right=0
  for ((i = 0; i < n; i++)); do
    line=$(grep -E "^ +\[$i\] +[-0-9]" "$OUT/logs/clip.log" | tail -n 1)
    read -r -a vals <<<"${line#*]}"
    best=$n
    for ((j = n; j < 2 * n; j++)); do
      awk -v a="${vals[$j]}" -v b="${vals[$best]}" 'BEGIN { exit !(a > b) }' && best=$j
    done
    [ "$best" -eq $((n + i)) ] && right=$((right + 1))
    rows+="<tr><th>$(fig "$(emoji google images "${shorts[$i]}")" "${shorts[$i]}")</th>"
    for ((j = n; j < 2 * n; j++)); do
      cls="num"
      [ "$j" -eq "$best" ] && cls="num best"
      rows+="<td class=\"$cls\">${vals[$j]}</td>"
    done
    rows+="</tr>"
  done
  body="<table class=\"metrics\">$head</tr>$rows</table><p>$right of $n pictures are closest to their own name (bold: each picture's best name).</p>"
  body+=$(runs_table "clip=the $n real Google emoji of section 2 and their emoji.json names")
  section clip "CLIP: <code>dmx train clip</code>, <code>dmx embed</code>" \
    "A small CLIP (2.2 M parameters, 4.4 MB) trained by dmx on both emoji styles' training pictures and their names; <code>dmx embed</code> prints the cosine similarity of every picture and text. Zero-shot on held-out emoji: docs/training.md." \
    "$body" "$(sec_ms)"
else
  skipped clip "CLIP: <code>dmx embed</code>" "no CLIP folder at $CLIP (set DMX_CLIP; dmx train clip makes one)"
fi

# ---- 11e. the DALL-E 2 stack: text -> prior -> picture, variations, interpolation ---------------------
if [ -f "$UNCLIP/model_index.json" ] && [ -f "$UNCLIP_I2I/model_index.json" ]; then
  sec_t0
  UN=(--steps "$STEPS" --guidance-scale "$GUIDANCE" --seed "$SEED" --quiet)
  ids=()
  figs=""
  for i in 0 1 2 3; do
    p=${PROMPTS[$i]}
    run "unclip_t2i_$i" "$DMX" generate --model "$UNCLIP" --prompt "$p" "${UN[@]}" --output "$OUT/unclip/t2i-$i.png"
    figs+=$(fig "txt2img/$i.png" "$(q "$p")<br>text only ($(esc "$MODEL"))")
    figs+=$(fig "unclip/t2i-$i.png" "$(q "$p")<br>text &rarr; prior &rarr; decoder")
    ids+=("unclip_t2i_$i=$(q "$p"); prior 25 steps, prior guidance 4, decoder $STEPS steps, guidance $GUIDANCE, seed $SEED")
  done
  body=$(row "text &rarr; prior &rarr; picture" "$figs")
  for e in cat pizza; do
    run "unclip_var_$e" "$DMX" variations --model "$UNCLIP_I2I" --image "$OUT/$(emoji google images "$e")" \
      --num-images 4 "${UN[@]}" --output "$OUT/unclip/var-$e.png"
    figs=$(fig "$(emoji google images "$e")" "source: $e (real)")
    for k in 0 1 2 3; do figs+=$(fig "unclip/var-$e-$k.png" "variation $k"); done
    body+=$(row "variations of $e" "$figs")
    ids+=("unclip_var_$e=the real google $e, no prompt, 4 pictures of seed $SEED")
  done
  INTERP_A=grinning
  INTERP_B=cat
  run unclip_interp "$DMX" variations --model "$UNCLIP_I2I" --image "$OUT/$(emoji google images "$INTERP_A")" \
    --interpolate-to "$OUT/$(emoji google images "$INTERP_B")" --num-images 5 "${UN[@]}" \
    --output "$OUT/unclip/interp.png"
  figs=$(fig "$(emoji google images "$INTERP_A")" "$INTERP_A (real)")
  for k in 0 1 2 3 4; do figs+=$(fig "unclip/interp-$k.png" "t = $k/4"); done
  figs+=$(fig "$(emoji google images "$INTERP_B")" "$INTERP_B (real)")
  body+=$(row "interpolation" "$figs")
  ids+=("unclip_interp=slerp between the CLIP image embeddings of the real $INTERP_A and $INTERP_B, 5 points, one seed")
  body+=$(runs_table "${ids[@]}")
  section unclip "The DALL-E 2 stack: <code>dmx train prior</code>, <code>dmx train unclip</code>" \
    "<code>$(esc "$UNCLIP")</code>: a prior (text to CLIP image embedding) and a decoder (the emoji UNet conditioned on the noise-augmented image embedding), both trained by dmx on emoji with dmx's own CLIP; <code>$(esc "$UNCLIP_I2I")</code> makes variations of a picture from its image embedding. Measures: docs/unclip.md." \
    "$body" "$(sec_ms)"
else
  skipped unclip "The DALL-E 2 stack: <code>dmx train prior</code>, <code>dmx train unclip</code>" "no unCLIP folders at $UNCLIP and $UNCLIP_I2I (set DMX_UNCLIP, DMX_UNCLIP_IMG2IMG; docs/unclip.md makes them)"
fi

# ---- 12. metrics: dmx eval -----------------------------------------------------------------------------
if ! "$DMX" eval --help >/dev/null 2>&1; then
  skipped eval "Metrics: <code>dmx eval</code>" "this build has no 'dmx eval' command"
elif [ ! -e "$CLASSIFIER" ]; then
  skipped eval "Metrics: <code>dmx eval</code>" "no evaluation classifier at $CLASSIFIER (set DMX_CLASSIFIER)"
else
  sec_t0
  # The real images `dmx eval` compares against: the whole emoji set at the model's size (about 10 s), built
  # once into the cache folder it looks in.
  EMOJI_DATA="${DMX_EMOJI_DATA:-$HOME/.cache/dmx/emoji-data}"
  if [ ! -f "$EMOJI_DATA/concepts.json" ]; then
    RUN_SOFT=1 run eval_data "$DMX" data emoji --out "$EMOJI_DATA" --size "$SIZE" --quiet || true
  fi
  # shellcheck disable=SC2206  # DMX_EVAL_ARGS is a word list on purpose
  EVAL_ARGS=(${DMX_EVAL_ARGS:---model $MODEL --classifier $CLASSIFIER --data $EMOJI_DATA --limit ${DMX_DEMO_EVAL_LIMIT:-32} --steps $STEPS --seed $SEED --out $OUT/eval})
  json=""
  if RUN_SOFT=1 run eval "$DMX" eval "${EVAL_ARGS[@]}" --json; then
    json=$(grep '^{' "$OUT/logs/eval.log" | tail -n 1 || true)
  fi
  if [ -z "$json" ]; then
    skipped eval "Metrics: <code>dmx eval</code>" "dmx eval failed or printed no JSON: $(tail -n 3 "$OUT/logs/eval.log" | tr '\n' ' ')"
  else
    rows=""
    while IFS= read -r kv; do
      [ -z "$kv" ] && continue
      k=${kv%%:*}
      v=${kv#*:}
      rows+="<tr><th>$(esc "${k//\"/}")</th><td class=\"num\">$(esc "${v//\"/}")</td></tr>"
    done < <(printf '%s' "$json" | tr -d '{}' | tr ',' '\n')
    body="<table class=\"metrics\">$rows</table>"
    body+=$(runs_table "eval=classifier $(esc "$CLASSIFIER"), the first ${DMX_DEMO_EVAL_LIMIT:-32} prompts of dmx eval's built-in list")
    section eval "Metrics: <code>dmx eval</code>" \
      "Top-1/top-5 accuracy of the evaluation classifier on generated images of the prompted emoji, and the Fr&eacute;chet distance between generated and real images in the classifier's feature space (<code>frechet_real</code>: real against real, the floor)." \
      "$body" "$(sec_ms)"
  fi
fi

# ---- 13. the page --------------------------------------------------------------------------------------
T_END=${EPOCHREALTIME//[.,]/}
TOTAL_MS=$(( (T_END - T_RUN) / 1000 ))
ALL_MS=$(( (T_END - T_START) / 1000 ))
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
summary=""
for kv in "${SECTION_MS[@]}"; do
  IFS="=" read -r s_name s_ms s_cpu <<<"$kv"
  summary+="<tr><td>$s_name</td><td class=\"num\">$(secs "$s_ms")&nbsp;s</td><td class=\"num\">$(secs "$s_cpu")&nbsp;s</td></tr>"
done
skip_note=""
[ ${#SKIPPED[@]} -gt 0 ] && skip_note="<p class=\"skip\">Skipped: ${SKIPPED[*]} (see the sections).</p>"
page="$OUT/index.html"
cat >"$page.tmp.$$" <<EOF
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dmx demo: the emoji model family</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 40px; color: #222; background: #fafafa; }
h1 { margin: 24px 0 4px; } h2 { border-top: 1px solid #ddd; padding-top: 18px; margin-top: 32px; }
.t { color: #777; font-size: 70%; font-weight: normal; }
code, pre { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
.row { display: flex; gap: 12px; align-items: flex-start; margin: 10px 0; }
.label { flex: 0 0 150px; font-weight: 600; padding-top: 6px; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; max-width: 100%; } figcaption { font-size: 13px; color: #444; max-width: 192px; }
img { image-rendering: pixelated; image-rendering: crisp-edges; background: #fff; border: 1px solid #ccc; max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 10px 0; } th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
table.runs td code { white-space: pre-wrap; word-break: break-all; } table.runs { width: 100%; font-size: 13px; }
.num { text-align: right; white-space: nowrap; } .skip { color: #a40; font-weight: 600; } .best { font-weight: 700; background: #e8f4e8; }
nav ul { columns: 2; }
</style>
</head>
<body>
<h1>dmx demo: the emoji model family</h1>
<p>Every image on this page was made by <code>scripts/demo.sh</code> (<code>make demo</code>) with the real
<code>dmx</code> command line on this machine. Model: <code>$(esc "$MODEL")</code>; $(esc "$("$DMX" version 2>/dev/null || echo dmx)");
$(nproc) cores ($(esc "${cpu:-unknown CPU}")); $(date -u '+%Y-%m-%d %H:%M UTC').
The demo took <b>$(secs "$TOTAL_MS")&nbsp;s</b> after the build ($(secs "$ALL_MS")&nbsp;s including setup and build).
Images of ${SIZE}&times;${SIZE} pixels (the model's size) are shown enlarged without smoothing.</p>
$skip_note
<nav><ul>$TOC</ul></nav>
$SECTIONS_HTML
<section id="times"><h2>Time per section</h2>
<table><tr><th>section</th><th>wall time</th><th>CPU time (user + system)</th></tr>$summary<tr><th>total (after the build)</th><th class="num">$(secs "$TOTAL_MS")&nbsp;s</th><th class="num">$(secs "$CPU_TOTAL_MS")&nbsp;s</th></tr></table>
<p>The log of every step is in <code>logs/</code>.</p></section>
</body>
</html>
EOF
mv -f "$page.tmp.$$" "$page"
case "$page" in /*) page_abs="$page" ;; *) page_abs="$(pwd)/$page" ;; esac
echo "demo: done in $(secs "$TOTAL_MS") s after the build (CPU $(secs "$CPU_TOTAL_MS") s) ($(secs "$ALL_MS") s in all); open $page_abs" >&2
