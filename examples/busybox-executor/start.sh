#!/bin/sh
# The executor on 8080 (like the seed's), the hooks on 9000.
nc -ll -p 8080 -e /srv/executor.sh &
exec nc -ll -p 9000 -e /srv/hook.sh
