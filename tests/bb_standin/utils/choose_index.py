"""Stand-in: a random fraction of the clean training set, or the indices listed in a file."""
import random

import numpy as np


def choose_index(args, data_all_length):
    if args.index is None:
        return random.sample(range(data_all_length), int(data_all_length * args.ratio))
    return np.loadtxt(args.index, dtype=int)
