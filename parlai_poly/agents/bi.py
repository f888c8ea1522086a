"""The bi-encoder agent: ``-m parlai_poly.agents:bi``."""
from ..modules import BiEncoderModule
from .cached_candidates import CachedCandidateAgent


class BiEncoderAgent(CachedCandidateAgent):
    agent_name = "bi"

    def build_model(self):
        context, candidate = self.build_encoders()
        return BiEncoderModule(context, candidate, self.opt["reduction_type"], self.opt["reduction_first_m"])
