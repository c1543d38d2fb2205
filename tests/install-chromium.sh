#!/bin/sh
# Debian's chromium and chromedriver for the playground's browser test (selenium drives them; no
# browser is downloaded from anywhere else).
set -e
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
