#!/bin/sh
# Lifecycle hooks on 9000, one HTTP request per connection (busybox nc -e): always 200.
read -r m p v
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break; done
printf 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok'
