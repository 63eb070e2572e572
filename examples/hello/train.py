"""A small "training" run: prints progress, saves a model into the `modeldir` artifact and a metric line.

StudioML's fs_tracker finds artifact directories through STUDIOML_ARTIFACT_MAPPING; so does this script.
"""

import json
import os
import sys
import time

import humanize

epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 3
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))

loss = 1.0
for epoch in range(1, epochs + 1):
    loss = round(1.0 / (epoch + 1), 4)
    print(f"epoch {epoch}/{epochs} loss={loss}")
    time.sleep(0.2)

model = os.path.join(mapping["modeldir"], "model.json")
with open(model, "w") as f:
    json.dump({"epochs": epochs, "loss": loss}, f)
print(f"saved {model} ({humanize.naturalsize(os.path.getsize(model))})")
