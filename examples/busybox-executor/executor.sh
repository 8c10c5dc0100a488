#!/bin/sh
# A shell stand-in for the seed's executor (busybox has no Python), one HTTP request per
# connection (busybox nc -e). POST /execute with {"code": "..."} runs the code with sh in
# /workspace and answers {"stdout", "stderr", "exit_code"}; GET /health answers
# {"status": "ready"}; POST /echo answers its body. The code must not contain double quotes.
read -r method path version
len=0
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break
  case "$l" in [Cc]ontent-[Ll]ength:*) len=$(echo "${l#*:}" | tr -d ' ');; esac; done
body=""; if [ "$len" -gt 0 ] 2>/dev/null; then body=$(head -c "$len"); fi
esc() { sed 's/\\/\\\\/g; s/"/\\"/g' | awk '{printf "%s\\n", $0}'; }
case "$method $path" in
  "POST /execute")
    code=$(printf '%s' "$body" | sed -n 's/.*"code": *"\([^"]*\)".*/\1/p' | sed 's/\\n/\n/g')
    mkdir -p /workspace; cd /workspace
    out=$(sh -c "$code" 2>/tmp/stderr); rc=$?
    json="{\"stdout\": \"$(printf '%s' "$out" | esc)\", \"stderr\": \"$(esc </tmp/stderr)\", \"exit_code\": $rc}";;
  "GET /health") json='{"status": "ready"}';;
  "POST /echo") json="$body";;
  *) json='{"error": "not found"}';;
esac
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#json}" "$json"
