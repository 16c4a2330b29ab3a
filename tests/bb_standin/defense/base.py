"""Stand-in for BackdoorBench's defense base class: the life-cycle method names, nothing else."""


class defense(object):
    def add_arguments(parser):
        pass

    def set_result(self):
        pass

    def set_trainer(self):
        pass

    def set_logger(self):
        pass

    def denoising(self):
        pass

    def mitigation(self):
        pass

    def inhibition(self):
        pass

    def defense(self):
        pass

    def detect(self):
        pass
