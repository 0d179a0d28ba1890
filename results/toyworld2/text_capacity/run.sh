#!/bin/bash
# ToyWorld 2 UNet stage with a 6-layer, 128-wide text encoder (shipped: 3 x 64); data, VAE and scorer
# stages shared with runs/tw4. Resumable: rerun this script.
cd /work/main
python -m toyworld pretrain --out runs/tw7text --resume --threads 2 >> runs/tw7text.log 2>&1 && touch runs/tw7.done
