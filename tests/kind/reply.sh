#!/bin/sh
# The test server's reply (run by socat for each connection): the address the connection came
# from. The request head is read first, so closing never resets the connection before the
# client has read the answer.
while IFS= read -r line; do
  case "$line" in *[![:space:]]*) ;; *) break ;; esac
done
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n%s\n' "$SOCAT_PEERADDR"
