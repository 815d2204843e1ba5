#!/usr/bin/env bash
# Download the Code Llama weights with the signed URL from Meta's e-mail.
# Works with bash 3.2+ (macOS), wget or curl, md5sum or md5.

set -euo pipefail

USAGE='Usage: bash download.sh [--url URL] [--models LIST] [--target DIR]

Download Code Llama weights with the signed URL you received by e-mail.
Anything not given as a flag or environment variable is asked for.

Options:
  --url URL       the URL from the e-mail, with its "*"     (env: PRESIGNED_URL)
  --models LIST   comma-separated models, e.g. 7b,13b-Instruct,34b-Python;
                  empty or "all" means all 12                (env: MODEL_SIZE)
  --target DIR    folder to download into (default: .)       (env: TARGET_FOLDER)
  -h, --help      show this help and exit

Models: 7b 13b 34b 70b, each also as <size>-Python and <size>-Instruct.
Set DOWNLOADER=wget or DOWNLOADER=curl to choose the download tool
(default: wget if installed, else curl).

Re-running resumes interrupted downloads and skips complete files.
Each model is checked against the md5 sums in its checklist.chk.'

readonly ALL_MODELS="7b 13b 34b 70b 7b-Python 13b-Python 34b-Python 70b-Python 7b-Instruct 13b-Instruct 34b-Instruct 70b-Instruct"
readonly REQUEST_URL="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"

DL=""           # wget or curl
MD5=""          # md5sum or md5
URL=""          # cleaned signed URL; never printed (it holds the signature)
MODELS=""       # canonical model names, space-separated
FAILED=""       # files that failed their checksum, one per line
R_STATUS=""     # set by remote_info
R_LENGTH=""     # set by remote_info
GET_STATUS=""   # set by http_get

say() { printf '%s\n' "$*" >&2; }

# die LINE... : print an error (one argument per line) and exit 1.
die() {
  printf 'Error: %s\n' "$1" >&2
  shift
  if [ $# -gt 0 ]; then printf '%s\n' "$@" >&2; fi
  exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

trim() {
  local s=$1
  s=${s//$'\r'/}
  s=${s#"${s%%[![:space:]]*}"}
  s=${s%"${s##*[![:space:]]}"}
  printf '%s' "$s"
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# ---------------------------------------------------------------- arguments

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) printf '%s\n' "$USAGE"; exit 0 ;;
      --url|--models|--target)
        [ $# -ge 2 ] || die "$1 needs a value." "Run 'bash download.sh --help' for usage."
        set_option "$1" "$2"; shift 2 ;;
      --url=*|--models=*|--target=*)
        set_option "${1%%=*}" "${1#*=}"; shift ;;
      *) die "unknown argument: $1" "Run 'bash download.sh --help' for usage." ;;
    esac
  done
}

set_option() {
  case "$1" in
    --url) PRESIGNED_URL=$2 ;;
    --models) MODEL_SIZE=$2 ;;
    --target) TARGET_FOLDER=$2 ;;
  esac
}

# ---------------------------------------------------------------- tools

pick_tools() {
  case "${DOWNLOADER:-}" in
    "")
      # GNU wget only (busybox wget lacks --show-progress and --spider -S).
      if have wget && wget --version >/dev/null 2>&1; then DL=wget
      elif have curl; then DL=curl
      else die "neither wget nor curl was found." \
        "Install one of them (e.g. 'apt-get install wget' or 'brew install wget') and run download.sh again."
      fi ;;
    wget|curl)
      have "$DOWNLOADER" || die "DOWNLOADER=$DOWNLOADER, but $DOWNLOADER is not installed." \
        "Install it, or unset DOWNLOADER to use whichever of wget/curl is available."
      DL=$DOWNLOADER ;;
    *) die "DOWNLOADER must be 'wget' or 'curl' (got '$DOWNLOADER')." ;;
  esac
  if have md5sum; then MD5=md5sum
  elif have md5; then MD5=md5
  else die "neither md5sum nor md5 was found; they are needed to verify the downloads." \
    "Install coreutils (e.g. 'apt-get install coreutils') and run download.sh again."
  fi
}

# ---------------------------------------------------------------- questions

# ask PROMPT: read one line from stdin into ANSWER; fails on EOF with nothing read.
ANSWER=""
ask() {
  local line=""
  printf '%s' "$1" >&2
  if IFS= read -r line 2>/dev/null; then ANSWER=$line; return 0; fi
  printf '\n' >&2
  ANSWER=$line
  [ -n "$line" ]
}

get_url() {
  if [ -z "${PRESIGNED_URL:-}" ]; then
    ask "Enter the URL from email: " ||
      die "no download URL given, and none could be read from stdin." \
        "Pass it with --url URL or the PRESIGNED_URL environment variable."
    PRESIGNED_URL=$ANSWER
  fi
  URL=$(trim "$PRESIGNED_URL")
  # Strip quotes or <> that come along when copying from some mail clients.
  case "$URL" in
    \"*\") URL=${URL#\"}; URL=${URL%\"} ;;
    \'*\') URL=${URL#\'}; URL=${URL%\'} ;;
    \<*\>) URL=${URL#<}; URL=${URL%>} ;;
  esac
  check_url
}

url_host() {
  local h=${1#*://}
  h=${h%%[/?#]*}
  h=${h##*@}
  h=${h%:*}
  lower "$h"
}

# Reject URLs that cannot work, before any network request is made.
check_url() {
  local host rest copy_hint
  copy_hint="In the e-mail, select and copy the URL text itself (it starts with https://download...llamameta.net/*?Policy=), not the link's target ('Copy link address' gives a redirect link)."
  case "$URL" in
    http://*|https://*) ;;
    "") die "the download URL is empty." "$copy_hint" ;;
    *) die "the download URL must start with https://." "$copy_hint" ;;
  esac
  host=$(url_host "$URL")
  rest=$(lower "${URL#*://}")
  case "$host" in
    l.facebook.com|lm.facebook.com|l.messenger.com|l.instagram.com|l.workplace.com|\
    urldefense.com|*.urldefense.com|urldefense.proofpoint.com|\
    safelinks.protection.outlook.com|*.safelinks.protection.outlook.com|\
    *.mimecast.com|linkprotect.cudasvc.com|clicktime.symantec.com|*.trendmicro.com|secure-web.cisco.com)
      die "this is a redirect / safe-links wrapper ($host), not the download URL." "$copy_hint" ;;
  esac
  case "$rest" in
    google.com/url\?*|www.google.com/url\?*)
      die "this is a redirect wrapper ($host/url), not the download URL." "$copy_hint" ;;
  esac
  case "$URL" in
    *'*'*) ;;
    *) die "the URL contains no '*', so it is not the download URL from the e-mail (host: $host)." \
         "The URL looks like https://download2.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=..." \
         "$copy_hint" ;;
  esac
  case "$host" in
    llamameta.net|*.llamameta.net) ;;
    *) say "Note: $host is not a llamameta.net download host; using it anyway." ;;
  esac
}

# canonical_model NAME: print e.g. 13b-Python for "CodeLlama-13B-python"; fail if unknown.
canonical_model() {
  local m base suffix
  m=$(lower "$(trim "$1")")
  m=${m#codellama-}
  base=${m%%-*}
  suffix=${m#"$base"}
  case "$base" in 7b|13b|34b|70b) ;; *) return 1 ;; esac
  case "$suffix" in
    "") printf '%s' "$base" ;;
    -python) printf '%s' "$base-Python" ;;
    -instruct) printf '%s' "$base-Instruct" ;;
    *) return 1 ;;
  esac
}

get_models() {
  local list item name bad="" old_ifs
  if [ -z "${MODEL_SIZE+set}" ]; then
    ask "Enter the list of models to download without spaces (7b,13b,34b,70b,7b-Python,13b-Instruct,...), or press Enter for all: " || true
    MODEL_SIZE=$ANSWER
  fi
  list=$(trim "$MODEL_SIZE")
  if [ -z "$list" ] || [ "$(lower "$list")" = all ]; then
    MODELS=$ALL_MODELS
    say "Downloading all models: $MODELS"
    return 0
  fi
  old_ifs=$IFS
  IFS=,
  # shellcheck disable=SC2086  # split on commas on purpose
  set -- $list
  IFS=$old_ifs
  for item in "$@"; do
    [ -n "$(trim "$item")" ] || continue
    if name=$(canonical_model "$item"); then
      case " $MODELS " in *" $name "*) ;; *) MODELS="${MODELS:+$MODELS }$name" ;; esac
    else
      bad="${bad:+$bad, }$(trim "$item")"
    fi
  done
  [ -z "$bad" ] || die "unknown model name(s): $bad" \
    "Valid models (case does not matter, a CodeLlama- prefix is fine):" \
    "  7b, 13b, 34b, 70b, 7b-Python, 13b-Python, 34b-Python, 70b-Python," \
    "  7b-Instruct, 13b-Instruct, 34b-Instruct, 70b-Instruct" \
    "Example: --models 7b,13b-Instruct,34b-Python"
  [ -n "$MODELS" ] || die "no models given." "Example: --models 7b,13b-Instruct"
}

# One shard per model-parallel rank.
shard_count() {
  case "${1%%-*}" in 7b) echo 1 ;; 13b) echo 2 ;; 34b) echo 4 ;; 70b) echo 8 ;; esac
}

# ---------------------------------------------------------------- HTTP

local_size() {
  if [ -f "$1" ]; then wc -c <"$1" | tr -d ' '; else echo 0; fi
}

# remote_info URL: HEAD request; sets R_STATUS (000 if no answer) and R_LENGTH.
remote_info() {
  local out line
  R_STATUS=000
  R_LENGTH=""
  if [ "$DL" = curl ]; then
    out=$(curl --silent --head --location "$1" 2>/dev/null) || true
  else
    out=$(wget --spider --server-response --tries=2 --timeout=60 "$1" 2>&1) || true
  fi
  shopt -s nocasematch
  while IFS= read -r line; do
    line=$(trim "$line")
    case "$line" in
      HTTP/*)  # a new response (after a redirect) starts over
        line=${line#* }; R_STATUS=${line%% *}; R_LENGTH="" ;;
      content-length:*)
        R_LENGTH=$(trim "${line#*:}") ;;
    esac
  done <<<"$out"
  shopt -u nocasematch
  case "$R_LENGTH" in ''|*[!0-9]*) R_LENGTH="" ;; esac
}

# http_get URL DEST: resuming GET (HTTP Range from DEST's size). Sets GET_STATUS
# when the tool reports it (curl); the tools print no URL, so the signature stays private.
http_get() {
  local url=$1 dest=$2
  GET_STATUS=""
  if [ "$DL" = curl ]; then
    local progress=--silent
    if [ -t 2 ]; then progress=--progress-bar; fi
    local rc=0
    GET_STATUS=$(curl --fail --location --show-error "$progress" \
      --continue-at - --output "$dest" --write-out '%{http_code}' "$url") || rc=$?
    if [ "$rc" -eq 33 ]; then  # server ignores Range: start over (wget does so itself)
      say "The server cannot resume; downloading it from the start."
      rm -f "$dest"
      rc=0
      GET_STATUS=$(curl --fail --location --show-error "$progress" \
        --output "$dest" --write-out '%{http_code}' "$url") || rc=$?
    fi
    return "$rc"
  else
    if [ -t 2 ]; then
      wget --quiet --show-progress --continue --output-document="$dest" "$url" || return $?
    else
      wget --quiet --continue --output-document="$dest" "$url" || return $?
    fi
  fi
}

expired() {
  die "the server refused the link (HTTP 403 Forbidden) for $1." \
    "The link has expired (it is valid for 24 hours) or was used too many times." \
    "Request a new link at $REQUEST_URL" \
    "and run download.sh again with it; files already downloaded are kept."
}

# Flag an HTML/XML page saved where a binary or JSON file was expected.
check_not_html() {
  local dest=$1 rel=$2 head
  case "$rel" in *.pth|*.model|*.json|*.chk) ;; *) return 0 ;; esac
  [ -f "$dest" ] || return 0
  head=$(head -c 64 "$dest" | LC_ALL=C tr -d '\000\t\n\r ' | LC_ALL=C tr '[:upper:]' '[:lower:]' | head -c 9)
  case "$head" in
    '<!doctype'*|'<html'*|'<?xml'*|'<head'*)
      mv -f "$dest" "$dest.error.html"
      die "the server sent an HTML/XML page instead of $rel (saved as $dest.error.html)." \
        "The link is probably not the download URL itself, or it has expired." \
        "Copy the URL text from the e-mail (or request a new link at $REQUEST_URL) and run download.sh again." ;;
  esac
}

# fetch REL DEST: download $URL with '*' replaced by REL into DEST.
#
# Resume/skip logic: if DEST exists, a HEAD request gives the remote size;
# equal size = complete (skip, no GET), smaller = resume with a Range GET,
# larger = broken, start over. We ask first instead of relying on a Range GET
# past the end, because servers and tools disagree on that case (HTTP 416,
# wget/curl exit codes). If HEAD gives no size, we GET with resume anyway and
# treat 416 "range not satisfiable" as complete; md5 checks catch the rest.
fetch() {
  local rel=$1 dest=$2 url size rc=0 status
  url=${URL/'*'/"$rel"}
  size=$(local_size "$dest")
  if [ "$size" -gt 0 ]; then
    remote_info "$url"
    if [ "$R_STATUS" = 403 ]; then expired "$rel"; fi
    if [ "${R_STATUS#2}" != "$R_STATUS" ] && [ -n "$R_LENGTH" ]; then
      if [ "$size" -eq "$R_LENGTH" ]; then
        say "Already complete: $rel"
        check_not_html "$dest" "$rel"
        return 0
      elif [ "$size" -gt "$R_LENGTH" ]; then
        say "Local $rel is larger than the server's copy; downloading it again."
        rm -f "$dest"
        size=0
      fi
    fi
  fi
  if [ "$size" -gt 0 ]; then say "Resuming $rel from byte $size"; else say "Downloading $rel"; fi

  http_get "$url" "$dest" || rc=$?
  if [ "$rc" -ne 0 ]; then
    status=$GET_STATUS
    if [ -z "$status" ] || [ "$status" = 000 ]; then
      remote_info "$url"   # wget --quiet does not report the status
      status=$R_STATUS
      size=$(local_size "$dest")
      if [ -n "$R_LENGTH" ] && [ "$size" -gt 0 ] && [ "$size" -eq "$R_LENGTH" ]; then status=416; fi
    fi
    case "$status" in
      416) say "Already complete: $rel" ;;
      403) expired "$rel" ;;
      404) die "$rel was not found on the server (HTTP 404)." \
             "Check that the URL is the one from your e-mail; if it is, request a new link at $REQUEST_URL" ;;
      000) die "could not reach the server while downloading $rel ($DL exit code $rc)." \
             "Check your network connection and run download.sh again; finished files are kept and partial ones resume." ;;
      *) die "downloading $rel failed (HTTP $status, $DL exit code $rc)." \
           "Run download.sh again: finished files are kept and partial ones resume." \
           "If it keeps failing, delete $dest and try again." ;;
    esac
  fi
  check_not_html "$dest" "$rel"
}

# ---------------------------------------------------------------- checksums

file_md5() {
  local out
  if [ "$MD5" = md5sum ]; then out=$(md5sum "$1"); else out=$(md5 -r "$1"); fi
  out=${out%%[[:space:]]*}
  lower "${out#\\}"
}

# verify DIR MODEL_PATH: check DIR/checklist.chk (md5sum format); add failures to FAILED.
verify() {
  local dir=$1 model_path=$2 line sum name actual n=0 bad=0
  say "Checking checksums of $model_path"
  while IFS= read -r line || [ -n "$line" ]; do
    line=$(trim "$line")
    case "$line" in ''|'#'*) continue ;; esac
    sum=${line%%[[:space:]]*}
    name=$(trim "${line#"$sum"}")
    name=${name#\*}   # md5sum's binary-mode marker
    n=$((n + 1))
    if [ ! -f "$dir/$name" ]; then
      say "  $name: MISSING"
    else
      actual=$(file_md5 "$dir/$name")
      if [ "$actual" = "$(lower "$sum")" ]; then say "  $name: OK"; continue; fi
      say "  $name: FAILED"
    fi
    bad=1
    FAILED="${FAILED}  $dir/$name"$'\n'
  done <"$dir/checklist.chk"
  if [ "$n" -eq 0 ]; then
    FAILED="${FAILED}  $dir/checklist.chk (empty or unreadable)"$'\n'
  elif [ "$bad" -eq 0 ]; then
    return 0
  fi
  return 1
}

# ---------------------------------------------------------------- main

download_model() {
  local model=$1 model_path dir shards s shard
  model_path="CodeLlama-$model"
  dir="$TARGET_FOLDER/$model_path"
  mkdir -p "$dir"
  say ""
  say "=== $model_path ==="
  shards=$(shard_count "$model")
  for ((s = 0; s < shards; s++)); do
    shard=$(printf 'consolidated.%02d.pth' "$s")
    fetch "$model_path/$shard" "$dir/$shard"
  done
  fetch "$model_path/params.json" "$dir/params.json"
  fetch "$model_path/tokenizer.model" "$dir/tokenizer.model"
  fetch "$model_path/checklist.chk" "$dir/checklist.chk"
  verify "$dir" "$model_path" || true
}

main() {
  local model
  parse_args "$@"
  pick_tools
  get_url
  get_models
  TARGET_FOLDER=${TARGET_FOLDER:-.}
  case "$TARGET_FOLDER" in -*) TARGET_FOLDER="./$TARGET_FOLDER" ;; esac
  mkdir -p "$TARGET_FOLDER"
  trap 'say ""; say "Interrupted. Run download.sh again to resume where it stopped."; exit 130' INT

  say "Downloading LICENSE and Acceptable Usage Policy into $TARGET_FOLDER (using $DL)"
  fetch "LICENSE" "$TARGET_FOLDER/LICENSE"
  fetch "USE_POLICY.md" "$TARGET_FOLDER/USE_POLICY.md"
  for model in $MODELS; do
    download_model "$model"
  done

  say ""
  if [ -n "$FAILED" ]; then
    printf 'Error: checksum verification failed for:\n%s' "$FAILED" >&2
    say "These files are corrupt or incomplete. Delete them and run download.sh again to fetch them anew."
    exit 1
  fi
  say "Done: all files downloaded and verified in $TARGET_FOLDER"
}

main "$@"
