"""Demo names and one-line summaries, importable without torch (for `gradcheck demo --list`)."""

DEMO_SUMMARIES = {
    "sigmoid-mlp": "the 2017 tutorial: 784-128x4-10 sigmoid MLP with N(0,1) weights; layer 1 learns far slower",
    "relu-he-mlp": "the tutorial's announced fixes: ReLU units and He (kaiming_normal_) init; comes out clean",
    "dying-relu": "relu-he-mlp trained 60 SGD steps at lr 1.0, too large: watch its ReLU units die, step by step",
}
