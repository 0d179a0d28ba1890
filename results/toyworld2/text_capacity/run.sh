#!/bin/bash
# ToyWorld 2 with a 6-layer, 128-wide text encoder (shipped: 3 x 64); every other key is the
# toyworld2 default (pretrain_config_text6x128.json is what it resolved to). Resumable: rerun it.
# The data, VAE and scorer stages are seeded and do not depend on the text encoder (the measured run
# shared them by hard link and retrained only the UNet stage). Then the page's evaluation, from the
# repository root.
set -e
if [ -f runs/tw7text/config.json ]; then
  python -m toyworld pretrain --out runs/tw7text --resume --threads 2
else
  python -m toyworld pretrain --world toyworld2 --out runs/tw7text --threads 2 \
      --set sizes.text_width=128 --set sizes.text_layers=6
fi
for g in 4 7.5; do
  python -m toyworld evaluate --model runs/tw7text/model --seeds 4 --guidance-scale $g > runs/tw7text/text6x128_g$g.json
done
