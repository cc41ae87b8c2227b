#!/usr/bin/env bash
# Renders the shipped prompt set (softswitch/prompts/sounds/{en,zh}/*.wav) with espeak-ng and sox.
#
# The WAV files are committed: the softswitch needs neither tool at run time. Run this again only when a
# text below changes (apt-get install espeak-ng sox). Output: 8 kHz, 16-bit, mono PCM WAV (what the media
# workers' file player and G.711 want), leading and trailing silence trimmed, 80 ms of silence on each
# side, peak normalised to -3 dBFS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=softswitch/prompts/sounds
for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "$tool is required: apt-get install espeak-ng sox" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

render() {  # language voice name text
    local lang=$1 voice=$2 name=$3 text=$4
    mkdir -p "$OUT/$lang"
    espeak-ng -v "$voice" -s 150 -w "$work/raw.wav" "$text"
    sox "$work/raw.wav" -r 8000 -c 1 -b 16 -e signed-integer "$OUT/$lang/$name.wav" \
        silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse pad 0.08 0.08 norm -3
}

en() { render en en-us "$1" "$2"; }
zh() { render zh cmn "$1" "$2"; }

digits_en=(zero one two three four five six seven eight nine)
digits_zh=(零 一 二 三 四 五 六 七 八 九)
for d in 0 1 2 3 4 5 6 7 8 9; do
    en "digit_$d" "${digits_en[$d]}"
    zh "digit_$d" "${digits_zh[$d]}"
done
en digit_star "star";   zh digit_star "星号"
en digit_pound "pound"; zh digit_pound "井号"

en enter_digits "Please enter some digits, then press the pound key."
zh enter_digits "请输入数字，以井号键结束。"
en you_entered "You entered"
zh you_entered "您输入的是"
en no_digits "No digits were entered."
zh no_digits "您没有输入数字。"
en goodbye "Goodbye."
zh goodbye "再见。"
en queue_position "You are caller number"
zh queue_position "您的排队位置是"
en welcome "Welcome."
zh welcome "欢迎致电。"
en ivr_demo "For support, press 1. For the conference, press 2."
zh ivr_demo "技术支持请按1，会议请按2。"
en invalid_choice "That is not a valid choice."
zh invalid_choice "输入有误。"
en not_available "The number you dialled is not available. Please try again later."
zh not_available "您拨打的号码暂时无法接通，请稍后再拨。"

# Music on hold: a soft, slow arpeggio (C E G C'), twice; no speech, the same for every language.
mkdir -p "$OUT/common"
notes=()
for f in 261.63 329.63 392.00 523.25 392.00 329.63; do
    sox -n -r 8000 -c 1 -b 16 -e signed-integer "$work/note-${#notes[@]}.wav" synth 0.8 sine "$f" fade q 0.08 0.8 0.3
    notes+=("$work/note-${#notes[@]}.wav")
done
sox "${notes[@]}" "${notes[@]}" -r 8000 -c 1 -b 16 -e signed-integer "$OUT/common/music_on_hold.wav" vol 0.3
echo "prompts written under $OUT"
